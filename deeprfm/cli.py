"""The ``deeprfm`` command line: fit models on local datasets and print their tables.

Every sub-command answers ``--help``; bad arguments exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["main"]


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="digits", help="dataset name: digits (bundled), cifar10, mnist, svhn"
    )
    parser.add_argument("--root", default=None, help="folder holding the dataset files")
    parser.add_argument(
        "--n-train", type=int, default=None, help="class-balanced training subsample"
    )
    parser.add_argument("--n-test", type=int, default=None, help="class-balanced test subsample")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default=None, help="write the results to this netCDF file")
    parser.add_argument("--verbose", action="store_true", help="progress bars and log messages")


def _add_rfm_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "rfm",
        help="fit a Recursive Feature Machine and print a per-iteration table",
        description="Fit an RFMClassifier on a dataset's training split and print, per "
        "iteration, the train and test accuracy and the seconds taken.",
    )
    _add_data_arguments(parser)
    parser.add_argument(
        "--kernel", default="laplace", choices=["laplace", "gaussian", "gen_laplace"]
    )
    parser.add_argument("--bandwidth", type=float, default=10.0, help="kernel bandwidth L")
    parser.add_argument("--reg", type=float, default=1e-3, help="ridge regularisation")
    parser.add_argument("--iters", type=int, default=5, help="number of AGOP iterations")
    parser.add_argument("--solver", default="auto", choices=["auto", "direct", "eigenpro"])
    _add_run_arguments(parser)
    parser.set_defaults(run=_run_rfm)


def _load_split(args: argparse.Namespace, split: str, n: int | None):
    from deeprfm.data import load_dataset

    return load_dataset(args.dataset, root=args.root, split=split, n=n, random_state=args.seed)


def _run_rfm(args: argparse.Namespace) -> None:
    from deeprfm.rfm import RFMClassifier

    X_train, y_train = _load_split(args, "train", args.n_train)
    X_test, y_test = _load_split(args, "test", args.n_test)
    model = RFMClassifier(
        kernel=args.kernel,
        bandwidth=args.bandwidth,
        reg=args.reg,
        iters=args.iters,
        solver=args.solver,
        early_stopping=False,
        device=args.device,
        random_state=args.seed,
        verbose=args.verbose,
    )
    print(
        f"RFM on {args.dataset}: {len(X_train)} train / {len(X_test)} test points, "
        f"{X_train.shape[1]} features, {len(np.unique(y_train))} classes"
    )
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    history = model.history_
    print_table(
        ["iteration", "train acc", "test acc", "seconds"],
        [
            [int(i), float(tr), float(te), float(s)]
            for i, tr, te, s in zip(
                history.iteration.values,
                history.train_acc.values,
                history.val_acc.values,
                history.seconds.values,
                strict=True,
            )
        ],
    )
    if args.out:
        history.rename(val_acc="test_acc", val_mse="test_mse").to_netcdf(args.out)
        print(f"history written to {args.out}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Print rows under headers in aligned columns (floats with 4 decimals)."""
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deeprfm`` command."""
    parser = argparse.ArgumentParser(
        prog="deeprfm",
        description="Recursive Feature Machines, Deep RFM and neural-collapse analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_rfm_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        parser.exit(2, f"deeprfm {args.command}: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
