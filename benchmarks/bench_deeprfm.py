"""Deep RFM benchmark: seconds per layer and phase, and peak memory, on CIFAR-shaped data.

``DeepRFM(layers=5)`` (width 1 024, one AGOP iteration per layer) on synthetic data shaped like
CIFAR-10 (n = 10 000 training and 2 000 test points, d = 3 072, 10 classes): each class is a
Gaussian blob around a random mean in a 64-dimensional subspace, plus isotropic noise, so the
task is learnable but not trivially separable. Prints, per layer, the seconds of the RFM fit,
of the projection and random features, and of the collapse metrics, with accuracies and NC1,
then the whole fit's seconds and the process's peak resident memory. The targets on a 2-core
CPU: the whole fit under 10 minutes, peak memory under 8 GB.

Run: ``python benchmarks/bench_deeprfm.py [--small] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from deeprfm import DeepRFM


def cifar_shaped(n: int, d: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-blob data: labels uniform, x = mean[label] + noise, means in a 64-dim subspace."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 64)))[0]
    means = rng.standard_normal((classes, 64)) @ basis.T * 1.5
    labels = rng.integers(0, classes, n)
    X = means[labels] + rng.standard_normal((n, d)) * 0.5
    return X.astype(np.float32), labels


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="n = 2 000, d = 768 for a quick run")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    n, d = (2000, 768) if args.small else (10_000, 3072)
    X, y = cifar_shaped(n + n // 5, d, 10)
    X_train, y_train, X_test, y_test = X[:n], y[:n], X[n:], y[n:]
    model = DeepRFM(layers=5, device=args.device, random_state=0)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}")
    print(f"DeepRFM(layers=5, width=1024) on n = {n}, d = {d}, 10 classes")
    start = time.perf_counter()
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    total = time.perf_counter() - start
    c = model.collapse_
    print(
        f"{'layer':>5} {'RFM s':>7} {'map s':>7} {'collapse s':>10} {'train acc':>9} "
        f"{'test acc':>8} {'nc1_trace':>9}"
    )
    for layer in c.layer.values:
        row = c.sel(layer=layer)
        print(
            f"{layer:>5d} {float(row.rfm_seconds):>7.1f} {float(row.map_seconds):>7.1f} "
            f"{float(row.collapse_seconds):>10.1f} {float(row.train_acc):>9.4f} "
            f"{float(row.eval_acc):>8.4f} {float(row.nc1_trace.sel(stage='input')):>9.4f}"
        )
    print(f"whole fit: {total:.1f} s; peak resident memory: {peak_rss_gb():.2f} GiB")
    if model.X_fit_.device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 1024**3:.2f} GiB")


if __name__ == "__main__":
    main()
