"""EigenPro: kernel regression and RFM at a training-set size the direct solve cannot reach.

The direct (Cholesky) solve needs the n×n kernel matrix twice: 80 GB in float32 at
n = 100 000. `deeprfm.solvers.EigenProSolver` (Ma & Belkin 2019) never forms it: it runs
preconditioned mini-batch SGD whose batch and step sizes follow from the spectrum of a Nyström
subsample, so memory grows like n·(d + c) + batch·n and nothing needs tuning.

The data are a synthetic *random-teacher* problem: x ~ N(0, I_32) and the label is the argmax
of a random linear map of the first 4 coordinates, so only 4 of the 32 directions matter — the
situation where an RFM's learned metric pays off. The script

1. solves kernel ridge regression (Laplace kernel) directly on at most 10 000 training points,
2. solves it with a standalone `EigenProSolver` on all n points (n = 100 000; 5 000 in small
   mode), with a validation set choosing the epoch,
3. fits ``RFMClassifier(solver=EigenProSolver(...), iters=1)`` on all n points,

and prints for each the test accuracy, the seconds and the peak memory so far (resident set
size from `resource.getrusage`, plus the CUDA peak on a GPU), EigenPro's automatic settings and
the RFM's per-iteration history. Expect EigenPro to match the direct solve at equal n and the
RFM to beat the plain kernel clearly.

It writes to ``--out`` (default: a fresh temporary folder): ``results.csv`` (the summary table)
and ``rfm_history.nc`` (the RFM's ``history_``).

Run ``python examples/eigenpro_large_n.py [--small] [--out DIR] [--device cuda]``;
``DEEPRFM_SMALL=1`` is the same as ``--small`` (under 30 s on two CPU cores). The full run is
meant for a GPU: an epoch costs about one n×n×d kernel evaluation, which at n = 100 000 takes
several minutes on a two-core CPU (progress bars show the epochs).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import pandas as pd
import torch
from _example import example_parser, output_dir

from deeprfm import LaplaceKernel, RFMClassifier
from deeprfm.solvers import DirectSolver, EigenProSolver, KernelSolver

DIMENSION, RELEVANT, CLASSES = 32, 4, 5
BANDWIDTH, REG = 10.0, 1e-3
#: Largest training set given to the direct solve.
DIRECT_MAX = 10_000
#: (training, test points, EigenPro epochs, Nyström subsample size or None: the default).
NORMAL = (100_000, 10_000, 10, None)
SMALL = (5_000, 2_000, 5, 1_000)
VALIDATION = 2_000


def parse_args() -> argparse.Namespace:
    """Command-line arguments: ``--small``, ``--out``, ``--seed`` and ``--device``."""
    parser = example_parser(__doc__)
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    return parser.parse_args()


Split = tuple[np.ndarray, np.ndarray]


def random_teacher(sizes: tuple[int, ...], seed: int) -> list[Split]:
    """Independent splits (X (m, d) float32, labels (m,) int64) of the random-teacher problem."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((RELEVANT, CLASSES))
    X = rng.standard_normal((sum(sizes), DIMENSION)).astype(np.float32)
    labels = (X[:, :RELEVANT] @ teacher).argmax(axis=1)
    splits = np.cumsum(sizes)[:-1]
    return list(zip(np.split(X, splits), np.split(labels, splits), strict=True))


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """Peak memory of the process so far in GB: resident set size, and CUDA allocations."""
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes or KiB
    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * bytes_per_unit}
    if device.type == "cuda":
        peak["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device)
    return {name: value / 1e9 for name, value in peak.items()}


def kernel_regression(
    solver: KernelSolver,
    train: Split,
    test: Split,
    device: torch.device,
    validation: Split | None = None,
) -> tuple[float, dict]:
    """Fit one-hot kernel ridge regression with ``solver``; return test accuracy and info."""

    def tensors(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        X, labels = split
        return torch.from_numpy(X).to(device), torch.eye(CLASSES, device=device)[labels]

    kernel = LaplaceKernel(BANDWIDTH)
    X, Y = tensors(train)
    eval_set = None if validation is None else tensors(validation)
    fit = solver.solve(kernel, X, Y, reg=REG, eval_set=eval_set)
    predicted = kernel.apply(tensors(test)[0], X, fit.alpha).argmax(dim=1).cpu().numpy()
    return float((predicted == test[1]).mean()), fit.info


def main() -> None:
    args = parse_args()
    out = output_dir(args.out, "eigenpro_large_n_")
    n, n_test, epochs, subsample = SMALL if args.small else NORMAL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train, validation, test = random_teacher((n, VALIDATION, n_test), args.seed)
    print(
        f"random teacher: {n} training points in {DIMENSION} dimensions ({RELEVANT} relevant), "
        f"{CLASSES} classes, on {device}; the direct solve would need "
        f"{2 * n * n * 4 / 1e9:.1f} GB at this n\n"
    )
    rows = []

    def record(method: str, n_train: int, accuracy: float, start: float) -> None:
        seconds = time.perf_counter() - start
        rows.append(
            {"method": method, "n_train": n_train, "test_acc": accuracy, "seconds": seconds}
            | peak_memory_gb(device)
        )
        print(f"{method} on {n_train} points: test accuracy {accuracy:.4f} in {seconds:.1f} s")

    n_direct = min(n, DIRECT_MAX)
    start = time.perf_counter()
    subset = (train[0][:n_direct], train[1][:n_direct])
    accuracy, _ = kernel_regression(DirectSolver(), subset, test, device)
    record("direct kernel regression", n_direct, accuracy, start)

    solver = EigenProSolver(
        epochs=epochs, subsample_size=subsample, random_state=args.seed, verbose=not args.small
    )
    start = time.perf_counter()
    accuracy, info = kernel_regression(solver, train, test, device, validation)
    record("EigenPro kernel regression", n, accuracy, start)
    print(
        f"  EigenPro chose: subsample s={info['subsample_size']}, q={info['top_q']} damped "
        f"directions, batch {info['batch_size']} (critical {info['critical_batch_size']:.0f}), "
        f"step size {info['step_size']:.3g}; {info['epochs']} epochs (best {info['best_epoch']},"
        f" stopped by {info['stop_reason']}), setup {info['setup_seconds']:.1f} s, "
        f"{float(info['history'].seconds.mean()):.2f} s per epoch"
    )

    start = time.perf_counter()
    model = RFMClassifier(
        bandwidth=BANDWIDTH,
        reg=REG,
        iters=1,
        solver=solver,
        device=device,
        random_state=args.seed,
        verbose=not args.small,
    )
    model.fit(*train, eval_set=validation)
    record("RFM with EigenPro", n, model.score(*test), start)
    history = model.history_
    table = history[["train_acc", "eval_acc", "seconds"]].to_dataframe()
    print(table.to_string(float_format="{:.4f}".format))
    relevant = np.diag(model.M_)[:RELEVANT].sum() / np.trace(model.M_)
    print(
        f"share of the learned metric's trace on the {RELEVANT} relevant coordinates: "
        f"{relevant:.2f} (identity: {RELEVANT / DIMENSION:.2f})\n"
    )

    summary = pd.DataFrame(rows)
    print(summary.to_string(index=False, float_format="{:.4g}".format))
    summary.to_csv(out / "results.csv", index=False)
    history.to_netcdf(out / "rfm_history.nc")
    print(f"wrote {out / 'results.csv'} and {out / 'rfm_history.nc'}")


if __name__ == "__main__":
    main()
