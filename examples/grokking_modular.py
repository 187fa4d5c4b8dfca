"""Grokking modular addition with an RFM: test accuracy jumps from chance to 1 over AGOP iterations.

The task of Mallinar et al. (2024, arXiv 2407.20199): every pair (a, b) of residues mod p is a
sample, its input the two one-hot codes side by side (2p features), its label (a + b) mod p; in
the paper half of the p² pairs train and the rest test (small p needs more, see below). An
`RFMClassifier` with the paper's settings (Gaussian kernel, bandwidth 2.5, no ridge, mean-centred
AGOP, M = AGOP^{1/2} without normalisation)
interpolates the training pairs from the first iteration on, yet its test accuracy stays at chance
for several iterations and then climbs to 1: the features M learns, not the fit, generalise.

The script prints the train/test accuracy and MSE per iteration and writes to ``--out`` (default:
a fresh temporary folder):

* ``history.nc`` — the model's ``history_`` (netCDF; ``eval_*`` is the test split),
* ``grokking_curve.png`` — train and test accuracy against the iteration,
* ``agop_blocks.png`` — the learned M (2p × 2p), whole and without its diagonal: the a–b block
  becomes circulant, M[i, p + j] a function of (i − j) mod p (stripes along the diagonals), the
  block-circulant structure the paper describes.

Run ``python examples/grokking_modular.py [--paper] [--p P] [--iters T] [--train-fraction F]
[--op add] [--small] [--out DIR]``; ``--help`` lists the RFM's settings too (kernel, bandwidth,
ridge, centering, AGOP power, normalisation), each defaulting to the paper's. By default p = 23
with 70 % of the pairs training and 15 iterations, a few seconds on two CPU cores: at p = 23 half
of the pairs are too few to grok in reasonable time (docs/grokking.md has the measurements);
larger p needs a smaller fraction. ``--paper`` runs the paper's setting, p = 61 with half of the
pairs, 30 iterations (minutes). ``--small`` (or ``DEEPRFM_SMALL=1``) stops at 12 iterations.
"""

from __future__ import annotations

import argparse

import matplotlib
import numpy as np
import torch
from _example import example_parser, output_dir

from analysis import plot_matrix
from deeprfm import RFMClassifier
from deeprfm.data import MODULAR_OPERATIONS, modular_arithmetic

#: (p, train_fraction, iterations) of each mode.
NORMAL = (23, 0.7, 15)
SMALL = (23, 0.7, 12)
PAPER = (61, 0.5, 30)


def parse_args() -> argparse.Namespace:
    """Command-line arguments: the task, the RFM's settings, ``--small``, ``--out``, ``--seed``."""
    parser = example_parser(__doc__)
    parser.add_argument(
        "--paper", action="store_true", help="the paper's task: p = 61, half of the pairs"
    )
    parser.add_argument("--p", type=int, default=None, help="modulus (default 23)")
    parser.add_argument("--op", choices=MODULAR_OPERATIONS, default="add", help="operation")
    parser.add_argument(
        "--train-fraction", type=float, default=None, help="fraction of pairs that train"
    )
    parser.add_argument("--iters", type=int, default=None, help="AGOP iterations")
    parser.add_argument(
        "--kernel", choices=("gaussian", "laplace"), default="gaussian", help="paper: gaussian"
    )
    parser.add_argument("--bandwidth", type=float, default=2.5, help="kernel's L (paper: 2.5)")
    parser.add_argument(
        "--centering",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mean-centred AGOP (the paper's)",
    )
    parser.add_argument(
        "--normalize", choices=("none", "max"), default="none", help="scaling of M (paper: none)"
    )
    parser.add_argument("--reg", type=float, default=0.0, help="ridge (the paper's: 0)")
    parser.add_argument(
        "--agop-power", type=float, default=0.5, help="M = AGOP^power (the paper's: 0.5)"
    )
    return parser.parse_args()


def grok(args: argparse.Namespace, p: int, train_fraction: float, iters: int) -> RFMClassifier:
    """Fit the RFM on the task with the test split as ``eval_set`` and print its history."""
    X_train, X_test, y_train, y_test = modular_arithmetic(
        p, op=args.op, train_fraction=train_fraction, random_state=args.seed
    )
    print(
        f"(a {args.op} b) mod {p}: {len(y_train)} training and {len(y_test)} test pairs, "
        f"chance accuracy {1 / p:.3f}"
    )
    model = RFMClassifier(
        kernel=args.kernel,
        bandwidth=args.bandwidth,
        reg=args.reg,
        iters=iters,
        centering=args.centering,
        agop_power=args.agop_power,
        normalize=None if args.normalize == "none" else args.normalize,
        early_stopping=False,
        dtype=torch.float64,
        device="cpu",
    )
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    history = model.history_.rename(eval_acc="test_acc", eval_mse="test_mse")
    table = history[["train_acc", "test_acc", "train_mse", "test_mse", "seconds"]].to_dataframe()
    print(table.to_string(float_format="{:.4g}".format))
    return model


def plot_curve(history, p: int, path) -> None:
    """Train and test accuracy against the iteration, chance 1/p dotted, saved to ``path``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    ax.plot(history["iteration"], history["train_acc"], marker="o", label="train")
    ax.plot(history["iteration"], history["eval_acc"], marker="o", label="test")
    ax.axhline(1 / p, color="gray", linestyle=":", label="chance")
    ax.set(xlabel="RFM iteration", ylabel="accuracy", ylim=(-0.03, 1.03), title="grokking")
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_blocks(M: np.ndarray, path) -> None:
    """M and M without its diagonal, side by side, saved to ``path``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    plot_matrix(M, axes[0], title="M")
    plot_matrix(M - np.diag(np.diag(M)), axes[1], title="M without its diagonal")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    out = output_dir(args.out, "grokking_modular_")
    p, train_fraction, iters = PAPER if args.paper else SMALL if args.small else NORMAL
    p = args.p or p
    train_fraction = args.train_fraction or train_fraction
    iters = args.iters if args.iters is not None else iters

    model = grok(args, p, train_fraction, iters)
    history = model.history_
    history.to_netcdf(out / "history.nc")
    matplotlib.use("Agg")
    plot_curve(history, p, out / "grokking_curve.png")
    plot_blocks(model.M_, out / "agop_blocks.png")
    test = history["eval_acc"].values
    print(f"test accuracy {test[0]:.3f} at iteration 0, {test[-1]:.3f} at iteration {iters}")
    print(f"wrote {out / 'history.nc'}, {out / 'grokking_curve.png'}, {out / 'agop_blocks.png'}")


if __name__ == "__main__":
    main()
