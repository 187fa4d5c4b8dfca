"""EigenPro benchmark: float32 direct solve against EigenPro, and an RFM fit at n = 100 000.

Problem: a random-teacher classification task in d = 784 with 10 classes. A 16-dimensional
latent z ~ N(0, I) is embedded nonlinearly, x = tanh(A z) + 0.5·noise, rows scaled to unit
norm (as RFM expects); the label is the argmax of a random one-hidden-layer ReLU network of z
with standardised outputs (classes of similar size). Laplace kernel, bandwidth 10, ridge 1e-3.

Part 1 (n = 20 000 training, 2 000 validation, 5 000 test points): the time of one n×n×d
kernel evaluation (``kernel.apply``, blocked, the floor of an EigenPro epoch), the float32
direct solve (Cholesky) and EigenPro with its defaults and early stopping on the validation
set, and with a fixed 2, 3 or 4 epochs: seconds, test accuracy, peak resident memory,
epochs and seconds per epoch.

Part 2 (n = 100 000): the closed-form AGOP (``kernel_agop``, 5 000 evaluation points, all
centres) alone, its peak memory against its ``memory_gb`` budget; then
``RFMClassifier(solver=EigenProSolver(epochs=E), iters=1, memory_gb=B)``: peak resident
memory (the solves and the AGOP), seconds per epoch, per phase and in total.

Each measurement runs in a fresh process so that ``resource.getrusage`` reports its own peak.

Run: ``python benchmarks/bench_eigenpro.py [--small] [--part 1|2] [--rfm-epochs E]
[--memory-gb B]``; ``--small`` uses n = 4 000 and n = 10 000 for a quick check.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time

import torch

from deeprfm import RFMClassifier
from deeprfm._memory import memory_budget
from deeprfm.agop import kernel_agop
from deeprfm.kernels import LaplaceKernel
from deeprfm.solvers import DirectSolver, EigenProSolver

D, CLASSES, LATENT = 784, 10, 16
BANDWIDTH, REG = 10.0, 1e-3
FIXED_EPOCHS = (2, 3, 4)


def make_problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 784), unit-norm rows, and labels (n,) of the random-teacher task."""
    teacher = torch.Generator().manual_seed(1234)
    A = torch.randn(LATENT, D, generator=teacher) / math.sqrt(LATENT)
    W1 = torch.randn(LATENT, 64, generator=teacher)
    W2 = torch.randn(64, CLASSES, generator=teacher)
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, LATENT, generator=g)
    X = torch.tanh(Z @ A) + 0.5 * torch.randn(n, D, generator=g)
    X /= X.norm(dim=1, keepdim=True)
    logits = torch.relu(Z @ W1) @ W2
    # centring and scaling with fixed population statistics keeps the classes balanced
    reference = torch.relu(torch.randn(20_000, LATENT, generator=teacher) @ W1) @ W2
    logits = (logits - reference.mean(0)) / reference.std(0)
    return X, logits.argmax(dim=1)


def split(n_train: int, n_val: int, n_test: int):
    X, labels = make_problem(n_train + n_val + n_test)
    Y = torch.eye(CLASSES)[labels]
    a, b = n_train, n_train + n_val
    return (X[:a], Y[:a]), (X[a:b], Y[a:b]), (X[b:], labels[b:])


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def accuracy(kernel, X_test, labels, X, alpha) -> float:
    """Test accuracy; called after the peak memory of a solve is read."""
    return float((kernel.apply(X_test, X, alpha).argmax(1) == labels).double().mean())


def task_kernel(n: int) -> dict:
    (X, Y), _, _ = split(n, 0, 0)
    kernel = LaplaceKernel(BANDWIDTH)
    base = peak_rss_gb()
    start = time.perf_counter()
    kernel.apply(X, X, Y)
    return {"seconds": time.perf_counter() - start, "base_gb": base, "peak_gb": peak_rss_gb()}


def task_direct(n: int) -> dict:
    (X, Y), _, (X_test, labels) = split(n, 2000, 5000)
    kernel = LaplaceKernel(BANDWIDTH)
    base = peak_rss_gb()
    start = time.perf_counter()
    fit = DirectSolver().solve(kernel, X, Y, reg=REG)
    seconds, peak = time.perf_counter() - start, peak_rss_gb()
    return {
        "seconds": seconds,
        "accuracy": accuracy(kernel, X_test, labels, X, fit.alpha),
        "base_gb": base,
        "peak_gb": peak,
    }


def task_eigenpro(n: int, epochs: int) -> dict:
    """EigenPro with early stopping on the validation set (epochs = 0) or a fixed count."""
    (X, Y), validation, (X_test, labels) = split(n, 2000, 5000)
    kernel = LaplaceKernel(BANDWIDTH)
    solver = EigenProSolver(epochs=epochs or None, random_state=0)
    base = peak_rss_gb()
    start = time.perf_counter()
    fit = solver.solve(kernel, X, Y, reg=REG, eval_set=None if epochs else validation)
    seconds, peak = time.perf_counter() - start, peak_rss_gb()
    info, history = fit.info, fit.info["history"]
    per_epoch = history["seconds"].values
    return {
        "seconds": seconds,
        "accuracy": accuracy(kernel, X_test, labels, X, fit.alpha),
        "base_gb": base,
        "peak_gb": peak,
        "setup": info["setup_seconds"],
        "epochs": info["epochs"],
        "best_epoch": info["best_epoch"],
        "per_epoch": float(per_epoch.mean()),
        "eval_mse": history["eval_mse"].values.tolist() if not epochs else [],
        "residual": history["train_residual"].values.tolist(),
        **{key: info[key] for key in ("subsample_size", "top_q", "batch_size", "beta")},
    }


class EpochClock(logging.Handler):
    """Seconds of every EigenPro setup and epoch, from the solver's log records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setups: list[float] = []
        self.epochs: list[float] = []
        self._last = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("EigenPro setup"):
            self.setups.append(record.args[0])
        elif record.msg.startswith("EigenPro epoch"):
            self.epochs.append(record.created - self._last)
        else:
            return
        self._last = record.created


def task_agop(n: int, memory_mib: int) -> dict:
    """kernel_agop at n centres, 5 000 points, random coefficients; memory_mib = 0: default."""
    (X, Y), _, _ = split(n, 0, 0)
    alpha = (Y - Y.mean(0)) / n
    memory_gb = memory_mib / 1024 or None
    base = peak_rss_gb()
    start = time.perf_counter()
    kernel_agop(LaplaceKernel(BANDWIDTH), X, alpha, torch.eye(D), X[:5000], memory_gb=memory_gb)
    return {
        "seconds": time.perf_counter() - start,
        "budget_gb": memory_budget(memory_gb, X.device) / 1024**3,
        "base_gb": base,
        "peak_gb": peak_rss_gb(),
    }


def task_rfm(n: int, epochs: int, memory_mib: int) -> dict:
    (X, Y), (X_val, Y_val), (X_test, labels) = split(n, 5000, 5000)
    y, y_val = Y.argmax(1).numpy(), Y_val.argmax(1).numpy()
    solver = EigenProSolver(epochs=epochs, memory_gb=memory_mib / 1024 or None, random_state=0)
    model = RFMClassifier(
        bandwidth=BANDWIDTH,
        reg=REG,
        iters=1,
        agop_samples=5000,
        solver=solver,
        memory_gb=memory_mib / 1024 or None,
        random_state=0,
    )
    clock = EpochClock()
    logger = logging.getLogger("deeprfm")
    logger.addHandler(clock)
    logger.setLevel(logging.DEBUG)
    base = peak_rss_gb()
    start = time.perf_counter()
    model.fit(X.numpy(), y, eval_set=(X_val.numpy(), y_val))
    seconds = time.perf_counter() - start
    history = model.history_
    return {
        "seconds": seconds,
        "base_gb": base,
        "peak_gb": peak_rss_gb(),
        "setups": clock.setups,
        "epoch_seconds": clock.epochs,
        "solve": history["solve_seconds"].values.tolist(),
        "agop": float(history["agop_seconds"].values[0]),
        "eval_acc": history["eval_acc"].values.tolist(),
        "test_acc": float(model.score(X_test.numpy(), labels.numpy())),
        "epochs": epochs,
    }


def run(task: str, *args) -> dict:
    """Run one task in a fresh interpreter and return its JSON result."""
    command = [sys.executable, __file__, "--task", task, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def part1(n: int) -> None:
    """Direct against EigenPro at n training points."""
    print(f"\nPart 1: n = {n}, d = {D}, {CLASSES} classes, Laplace(L={BANDWIDTH}), reg={REG}")
    kernel = min((run("kernel", n) for _ in range(3)), key=lambda r: r["seconds"])
    direct = run("direct", n)
    runs = {"early stop": run("eigenpro", n, 0)}
    runs |= {f"{e} epochs": run("eigenpro", n, e) for e in FIXED_EPOCHS}
    print(f"one n×n×d kernel evaluation (kernel.apply, best of 3): {kernel['seconds']:.1f} s")
    print(
        f"\n{'solver':<22} {'seconds':>8} {'× direct':>8} {'test acc':>9} {'gap':>7} "
        f"{'peak GiB':>8} {'+GiB':>6} {'epochs':>7} {'s/epoch':>8}"
    )
    extra = direct["peak_gb"] - direct["base_gb"]
    print(
        f"{'direct (Cholesky)':<22} {direct['seconds']:>8.1f} {1:>8.2f} "
        f"{direct['accuracy']:>9.4f} {'':>7} {direct['peak_gb']:>8.2f} {extra:>6.2f}"
    )
    for name, e in runs.items():
        epochs = f"{e['best_epoch']}/{e['epochs']}" if name == "early stop" else str(e["epochs"])
        print(
            f"{'eigenpro, ' + name:<22} {e['seconds']:>8.1f} "
            f"{e['seconds'] / direct['seconds']:>8.2f} {e['accuracy']:>9.4f} "
            f"{100 * (e['accuracy'] - direct['accuracy']):>+7.2f} {e['peak_gb']:>8.2f} "
            f"{e['peak_gb'] - e['base_gb']:>6.2f} {epochs:>7} {e['per_epoch']:>8.1f}"
        )
    e = runs["early stop"]
    print(
        f"\nEigenPro: setup {e['setup']:.1f} s, s = {e['subsample_size']}, q = {e['top_q']}, "
        f"batch = {e['batch_size']}, beta = {e['beta']:.3g}; an epoch (validation included) "
        f"takes {e['per_epoch'] / kernel['seconds']:.2f} kernel evaluations"
    )
    print("val MSE by epoch:  ", " ".join(f"{v:.5f}" for v in e["eval_mse"]))
    print("train residual:    ", " ".join(f"{v:.4f}" for v in e["residual"]))


def part2(n: int, epochs: int, memory_mib: int) -> None:
    """The AGOP's memory against its budget, then an RFM fit with EigenPro, at n points."""
    print(f"\nPart 2: n = {n}, d = {D}")
    for mib in sorted({0, memory_mib}):
        agop = run("agop", n, mib)
        extra = agop["peak_gb"] - agop["base_gb"]
        verdict = "within" if extra <= agop["budget_gb"] else "OVER"
        print(
            f"kernel_agop (5 000 points), budget {agop['budget_gb']:.2f} GiB: "
            f"+{extra:.2f} GiB over the data ({verdict} the budget), peak "
            f"{agop['peak_gb']:.2f} GiB, {agop['seconds']:.0f} s"
        )
    budget = f"{memory_mib / 1024:g} GiB" if memory_mib else "default"
    print(f"RFMClassifier(iters=1, EigenProSolver(epochs={epochs})), memory_gb: {budget}")
    rfm = run("rfm", n, epochs, memory_mib)
    print(
        f"fit {rfm['seconds']:.0f} s: solves {', '.join(f'{s:.0f}' for s in rfm['solve'])} s, "
        f"of which EigenPro setups {', '.join(f'{s:.0f}' for s in rfm['setups'])} s and "
        f"epochs {', '.join(f'{s:.0f}' for s in rfm['epoch_seconds'])} s "
        f"(validation included); AGOP {rfm['agop']:.0f} s"
    )
    print(
        f"peak resident memory {rfm['peak_gb']:.2f} GiB (data and interpreter "
        f"{rfm['base_gb']:.2f} GiB); val acc by iteration "
        f"{', '.join(f'{a:.4f}' for a in rfm['eval_acc'])}; test acc {rfm['test_acc']:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="n = 4 000 and 10 000")
    parser.add_argument("--part", choices=("1", "2", "all"), default="all")
    parser.add_argument("--rfm-epochs", type=int, default=2, help="EigenPro epochs per solve")
    parser.add_argument(
        "--memory-gb", type=float, default=0.0, help="budget of part 2 (0: the default)"
    )
    parser.add_argument("--task", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task:
        name, *values = args.task
        tasks = {"kernel": task_kernel, "direct": task_direct, "eigenpro": task_eigenpro}
        tasks |= {"agop": task_agop, "rfm": task_rfm}
        print(json.dumps(tasks[name](*map(int, values))))
        return
    n, n_rfm = (4000, 10_000) if args.small else (20_000, 100_000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    if args.part in ("1", "all"):
        part1(n)
    if args.part in ("2", "all"):
        part2(n_rfm, args.rfm_epochs, round(args.memory_gb * 1024))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
