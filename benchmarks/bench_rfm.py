"""RFM benchmark: seconds per phase and the AGOP's achieved GFLOP/s against a matrix multiply.

Two problems: the XOR task of the tests (n = 2 000, d = 100) fitted end to end, and a
CIFAR-shaped synthetic problem (n = 10 000, d = 3 072, 10 classes) timed phase by phase:
kernel matrix, Cholesky solve, closed-form AGOP. The AGOP's floating-point work is counted
analytically and compared with a matrix multiply of the AGOP's dominant shape, timed in the
same run on the same device.

Run: ``python benchmarks/bench_rfm.py [--small] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deeprfm import LaplaceKernel, RFMClassifier, kernel_agop
from deeprfm._memory import resolve_device
from deeprfm.solvers import DirectSolver


def timed(fn, device: torch.device, repeat: int = 1):
    """Run ``fn`` ``repeat`` times; return (last result, best seconds)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def agop_flops(m: int, n: int, d: int, c: int) -> float:
    """Multiply-adds ×2 of the closed-form AGOP: distances, class-weighted sums, Gram, M·S·M."""
    return 2.0 * m * n * d + 2.0 * m * c * n * d + 2.0 * m * c * d * d + 4.0 * d**3


def matmul_gflops(rows: int, inner: int, cols: int, device, dtype) -> float:
    A = torch.randn(rows, inner, device=device, dtype=dtype)
    B = torch.randn(inner, cols, device=device, dtype=dtype)
    _, seconds = timed(lambda: A @ B, device, repeat=3)
    return 2.0 * rows * inner * cols / seconds / 1e9


def xor_task(device: torch.device, small: bool) -> None:
    rng = np.random.default_rng(0)
    n, d = (500, 50) if small else (2000, 100)
    X = rng.standard_normal((n + 1000, d))
    y = ((X[:, 0] > 0) ^ (X[:, 1] < 0.5)).astype(int)
    model = RFMClassifier(iters=5, device=device, random_state=0)
    _, seconds = timed(lambda: model.fit(X[:n], y[:n], eval_set=(X[n:], y[n:])), device)
    h = model.history_
    print(f"\nXOR task, n = {n}, d = {d}: fit in {seconds:.2f} s")
    print(f"{'iteration':>9} {'test acc':>9} {'solve s':>8} {'AGOP s':>8}")
    for i in h.iteration.values:
        print(
            f"{i:>9d} {h.eval_acc.values[i]:>9.4f} {h.solve_seconds.values[i]:>8.3f} "
            f"{h.agop_seconds.values[i]:>8.3f}"
        )


def cifar_shaped(device: torch.device, small: bool) -> None:
    n, d, c, m = (2000, 768, 10, 1000) if small else (10_000, 3072, 10, 2000)
    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    X = torch.rand(n, d, generator=g).to(device=device, dtype=dtype)
    X = X / X.norm(dim=1, keepdim=True)
    labels = torch.randint(0, c, (n,), generator=g)
    Y = torch.nn.functional.one_hot(labels, c).to(device=device, dtype=dtype)
    M = torch.eye(d, device=device, dtype=dtype)
    kernel = LaplaceKernel(10.0)
    _, kernel_s = timed(lambda: kernel(X, X, M), device)
    fit, total_s = timed(lambda: DirectSolver().solve(kernel, X, Y, M, reg=1e-3), device)
    Z = X[:m]
    _, agop_s = timed(lambda: kernel_agop(kernel, X, fit.alpha, M, Z), device)
    flops = agop_flops(m, n, d, c)
    agop_rate = flops / agop_s / 1e9
    mm_rate = matmul_gflops(min(m, 1024) * c, n, d, device, dtype)
    print(f"\nCIFAR-shaped synthetic, n = {n}, d = {d}, {c} classes, AGOP at m = {m} points")
    print(f"{'phase':<22} {'seconds':>8} {'GFLOP/s':>9}")
    print(f"{'kernel matrix':<22} {kernel_s:>8.2f} {2.0 * n * n * d / kernel_s / 1e9:>9.1f}")
    print(f"{'Cholesky solve':<22} {total_s - kernel_s:>8.2f} {'':>9}")
    print(f"{'AGOP (closed form)':<22} {agop_s:>8.2f} {agop_rate:>9.1f}")
    print(f"{'matrix multiply':<22} {'':>8} {mm_rate:>9.1f}")
    print(f"AGOP reaches {agop_rate / mm_rate:.0%} of the matrix multiply's GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes for a quick check")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device: {device}, torch {torch.__version__}, threads: {torch.get_num_threads()}")
    xor_task(device, args.small)
    cifar_shaped(device, args.small)


if __name__ == "__main__":
    main()
