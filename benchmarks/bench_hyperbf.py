"""HyperBF benchmark: a gradient step in closed form against autograd, and epochs of both modes.

1. One minibatch gradient of the HyperBF objective (c, centres, W) by the closed form of
   ``deeprfm._hyperbf_network.batch_gradients`` and by ``torch.func.grad`` of the same objective
   written with the same distance expansion, on a digits-shaped (d = 64) and a CIFAR-shaped
   (d = 3 072) problem; the closed form's floating-point work is counted analytically and
   compared with a matrix multiply timed in the same run.
2. Seconds per epoch of ``HyperBFClassifier`` with ``metric_update="gd"`` and ``"agop"`` on
   synthetic digits-shaped data, next to an RFM iteration on the same data.

Run: ``python benchmarks/bench_hyperbf.py [--small] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deeprfm import GaussianKernel, HyperBFClassifier, RFMClassifier
from deeprfm._hyperbf_network import Network, batch_gradients
from deeprfm._memory import resolve_device

BANDWIDTH = 4.0


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Best seconds of ``repeat`` calls of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def step_flops(b: int, m: int, d: int, r: int, k: int) -> float:
    """Multiply-adds ×2 of one closed-form step: projections, distances, the three (b, m)
    products with c, the pair sums and the two gradients of W and t."""
    return 2.0 * (b * d * r + m * d * r + b * m * r + 3 * b * m * k + 2 * b * m * r) + 2.0 * (
        b * r * d + 2 * m * r * d
    )


def autograd_objective(X, Y, centres, W, coef):
    """The batch objective (Gaussian kernel, no penalty) for torch.func, same expansion."""
    U, V = X @ W.T, centres @ W.T
    sq = (U**2).sum(1)[:, None] + (V**2).sum(1)[None, :] - 2 * U @ V.T
    K = torch.exp(-sq.clamp_min(0) / (2 * BANDWIDTH**2))
    return ((K @ coef - Y) ** 2).sum() / X.shape[0]


def compare_step(b: int, m: int, d: int, k: int, device: torch.device) -> str:
    """One table row: the closed-form step, autograd, and a matmul, on random data."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    X, Y = draw(b, d) * 3 / d**0.5, draw(b, k)
    net = Network(draw(m, d) * 3 / d**0.5, torch.eye(d, device=device), draw(m, k))
    kernel = GaussianKernel(BANDWIDTH)
    closed = timed(lambda: batch_gradients(kernel, X, Y, net, 0.0, "l2", b), device)
    grad = torch.func.grad(autograd_objective, argnums=(2, 3, 4))
    auto = timed(lambda: grad(X, Y, net.centres, net.W, net.coef), device)
    A, B = draw(m, d), draw(d, d)
    matmul = 2.0 * m * d * d / timed(lambda: A @ B, device) / 1e9
    achieved = step_flops(b, m, d, d, k) / closed / 1e9
    return (
        f"{b:>5} {m:>6} {d:>6} {closed:>9.4f} {auto:>10.4f} {auto / closed:>6.2f} "
        f"{achieved:>8.1f} {matmul:>14.1f}"
    )


def gradient_step(device: torch.device, small: bool) -> None:
    shapes = [(128, 500, 64, 10)] if small else [(128, 1000, 64, 10), (128, 1000, 3072, 10)]
    print(
        f"{'b':>5} {'m':>6} {'d':>6} {'closed s':>9} {'autograd s':>10} {'ratio':>6} "
        f"{'GFLOP/s':>8} {'matmul GFLOP/s':>14}"
    )
    for b, m, d, k in shapes:
        print(compare_step(b, m, d, k, device))


def epochs(device: torch.device, small: bool) -> None:
    rng = np.random.default_rng(0)
    n, d, m = (600, 64, 200) if small else (2000, 64, 500)
    X = rng.standard_normal((n, d))
    y = (X[:, :3] > 0).astype(int) @ np.array([1, 2, 4])
    common = {"bandwidth": BANDWIDTH, "n_centres": m, "device": device, "random_state": 0}
    runs = {
        "HyperBF gd (per epoch)": HyperBFClassifier(metric_update="gd", epochs=5, **common),
        "HyperBF agop (per epoch)": HyperBFClassifier(metric_update="agop", epochs=3, **common),
        "RFM gaussian (per iteration)": RFMClassifier(
            kernel="gaussian", bandwidth=BANDWIDTH, iters=3, device=device
        ),
    }
    print(f"\nn = {n}, d = {d}, HyperBF m = {m}:")
    for name, model in runs.items():
        model.fit(X, y)
        per = model.history_["seconds"].values[1:].mean()
        print(f"{name:>30}: {per:.4f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a quick run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    gradient_step(device, args.small)
    epochs(device, args.small)


if __name__ == "__main__":
    main()
