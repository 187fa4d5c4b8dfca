"""Benchmark: streaming CollapseAccumulator vs a naive dense d x d computation of NC1.

Synthetic features (n samples, d dims, K classes, float32, stored in memory) are fed in batches.

* ``streaming``: :class:`analysis.CollapseAccumulator` with all default metrics: a first pass
  (class sums), a second pass (K x K statistics), ``result()``. Memory O(K·d).
* ``naive dense``: the textbook computation: class means, the d x d within-class covariance
  Σ_W accumulated over the batches in float64, Σ_B (d x d), its pseudo-inverse of rank K-1 via
  ``eigh``, ``nc1 = tr(Σ_W Σ_B^+)/K`` and nearest-class-centre accuracy. Memory O(d²).

Each method runs in a fresh process so that its peak memory can be read from
``resource.getrusage`` (peak RSS above the process's RSS once the data exist). Throughput is
compared with a float64 matrix multiply of the same shape as each method's main product, timed
in the same run. Usage::

    python benchmarks/bench_collapse.py [--n 50000] [--d 4096] [--classes 10] [--batch 512]
                                        [--threads T]

On a machine shared with other jobs, ``--threads 1`` avoids OpenMP oversubscription, which can
slow small torch kernels down by orders of magnitude.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from analysis import CollapseAccumulator


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _make_data(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means + unit noise, written in place chunk by chunk (no full-size temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    means = 0.05 * torch.randn(k, d, generator=gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    x = torch.empty(n, d)
    for start in range(0, n, 128):
        y = labels[start : start + 128]
        x[start : start + 128] = means[y] + torch.randn(len(y), d, generator=gen)
    return x, labels


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int):
    for start in range(0, len(x), batch):
        yield x[start : start + batch], y[start : start + batch]


def _streaming(x: torch.Tensor, y: torch.Tensor, k: int, batch: int) -> dict:
    t0 = time.perf_counter()
    acc = CollapseAccumulator(k)
    for xb, yb in _batches(x, y, batch):
        acc.update(xb, yb)
    t1 = time.perf_counter()
    for xb, yb in _batches(x, y, batch):
        acc.update_second_pass(xb, yb)
    t2 = time.perf_counter()
    ds = acc.result()
    t3 = time.perf_counter()
    n, d = x.shape
    return {
        "seconds": t3 - t0,
        "detail": f"pass 1 {t1 - t0:.2f} s, pass 2 {t2 - t1:.2f} s, result {t3 - t2:.3f} s",
        # pass 1: shift, squared norms, index_add; pass 2: centring + (b x d)(d x K) product
        "flops": n * d * 4 + n * d * (1 + 2 * k) + 2 * n * k * k,
        "nc1": float(ds["nc1"]),
        "ncc_acc": float(ds["ncc_acc"]),
    }


def _naive(x: torch.Tensor, y: torch.Tensor, k: int, batch: int) -> dict:
    t0 = time.perf_counter()
    n, d = x.shape
    counts = torch.bincount(y, minlength=k).double()
    sums = torch.zeros(k, d, dtype=torch.float64)
    for xb, yb in _batches(x, y, batch):
        sums.index_add_(0, yb, xb.double())
    means = sums / counts[:, None]
    sigma_w = torch.zeros(d, d, dtype=torch.float64)
    hits = 0
    for xb, yb in _batches(x, y, batch):
        xb = xb.double()
        dev = xb - means[yb]
        sigma_w.addmm_(dev.T, dev)
        hits += int((torch.cdist(xb, means).argmin(1) == yb).sum())
    sigma_w /= n
    t1 = time.perf_counter()
    centred = means - means.mean(0)
    sigma_b = centred.T @ centred / k
    evals, evecs = torch.linalg.eigh(sigma_b)
    evals, evecs = evals[-(k - 1) :], evecs[:, -(k - 1) :]
    sigma_b_pinv = (evecs / evals) @ evecs.T
    nc1 = float((sigma_w * sigma_b_pinv).sum() / k)  # tr(Σ_W Σ_B^+)/K, Σ_B^+ symmetric
    t2 = time.perf_counter()
    return {
        "seconds": t2 - t0,
        "detail": f"passes {t1 - t0:.2f} s, d x d eigh + trace {t2 - t1:.2f} s",
        "flops": 2 * n * d * d + 3 * n * d * k + 2 * d * d * k + 4 * d**3,  # eigh ≈ 4d³
        "nc1": nc1,
        "ncc_acc": hits / n,
    }


def _matmul_gflops(m: int, kdim: int, ncols: int, repeat: int) -> float:
    a = torch.randn(m, kdim, dtype=torch.float64)
    b = torch.randn(kdim, ncols, dtype=torch.float64)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2.0 * m * kdim * ncols * repeat / (time.perf_counter() - t0) / 1e9


def _worker(method: str, n: int, d: int, k: int, batch: int, threads: int) -> dict:
    if threads > 0:
        torch.set_num_threads(threads)
    x, y = _make_data(n, d, k)
    base_rss, base_peak = _rss_bytes(), _peak_rss_bytes()
    out = {"streaming": _streaming, "naive": _naive}[method](x, y, k, batch)
    out["peak_mb"] = (_peak_rss_bytes() - base_rss) / 2**20
    out["detail"] += (
        f"; peak before the run {max(0, base_peak - base_rss) / 2**20:.0f} MiB above RSS"
    )
    out["data_mb"] = x.numel() * x.element_size() / 2**20
    if method == "streaming":  # thin product of pass 2 and a batch-sized squared-norm pass
        out["ref_gflops"] = _matmul_gflops(batch, d, k, repeat=max(1, n // batch))
        out["ref_name"] = f"({batch}x{d})@({d}x{k}) f64"
    else:  # the d x d rank-b update of Σ_W
        out["ref_gflops"] = _matmul_gflops(d, batch, d, repeat=3)
        out["ref_name"] = f"({d}x{batch})@({batch}x{d}) f64"
    return out


def _run(method: str, *args: int) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_worker, method, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (default: torch's choice)"
    )
    args = parser.parse_args()
    n, d, k, batch, threads = args.n, args.d, args.classes, args.batch, args.threads
    if threads > 0:
        torch.set_num_threads(threads)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    naive_bytes = 5 * d * d * 8 + n * d * 4
    print(
        f"n={n} d={d} K={k} batch={batch} torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, data {n * d * 4 / 2**20:.0f} MiB float32"
    )
    methods = ["streaming"] + (["naive"] if naive_bytes < 0.5 * ram else [])
    if "naive" not in methods:
        print(f"naive dense skipped: needs ~{naive_bytes / 2**30:.1f} GiB")
    results = {m: _run(m, n, d, k, batch, threads) for m in methods}

    header = (
        f"{'method':<12}{'seconds':>9}{'peak MiB':>10}{'GFLOP/s':>9}"
        f"{'matmul GFLOP/s':>16}  {'nc1':>12}{'ncc_acc':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<12}{r['seconds']:>9.2f}{r['peak_mb']:>10.0f}"
            f"{r['flops'] / r['seconds'] / 1e9:>9.2f}{r['ref_gflops']:>16.2f}"
            f"  {r['nc1']:>12.6g}{r['ncc_acc']:>9.4f}"
        )
    for name, r in results.items():
        print(f"  {name}: {r['detail']}; matmul reference {r['ref_name']}")
    if "naive" in results:
        s, v = results["streaming"], results["naive"]
        print(
            f"speed-up {v['seconds'] / s['seconds']:.1f}x, "
            f"nc1 relative difference {abs(s['nc1'] - v['nc1']) / abs(v['nc1']):.2e}, "
            f"ncc_acc difference {abs(s['ncc_acc'] - v['ncc_acc']):.1e}"
        )


if __name__ == "__main__":
    main()
