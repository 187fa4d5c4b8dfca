"""The ``deeprfm`` command line: fit models on local datasets and print their tables.

Every sub-command answers ``--help``; bad arguments exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np

from deeprfm.data import DATASETS

__all__ = ["main"]


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits (bundled with scikit-learn, the default) or a local cifar10/mnist/svhn",
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


def _add_collapse_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "collapse",
        help="fit a Deep RFM and print its per-layer accuracy and collapse table",
        description="Fit a DeepRFM on a dataset's training split; print, per layer, the train "
        "and test accuracy of the layer's RFM, the NC1 and NC2 of the training features "
        "entering the layer, and the seconds taken. Optionally write the collapse Dataset "
        "to netCDF and the collapse curves to PNG.",
    )
    _add_data_arguments(parser)
    parser.add_argument("--layers", type=int, default=5, help="number of layers")
    parser.add_argument("--width", type=int, default=1024, help="random features per layer")
    parser.add_argument("--feature-map", default="relu", choices=["relu", "laplace_rff"])
    parser.add_argument("--bandwidth", type=float, default=10.0, help="kernel bandwidth L")
    parser.add_argument("--reg", type=float, default=1e-3, help="ridge regularisation")
    parser.add_argument("--plot", default=None, help="write the collapse curves to this PNG")
    _add_run_arguments(parser)
    parser.set_defaults(run=_run_collapse)


def _add_plot_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw collapse curves from a saved netCDF file",
        description="Draw collapse curves (metrics against layer, log scale) from a netCDF "
        "file written by `deeprfm collapse --out` or `deeprfm probe --out`.",
    )
    parser.add_argument("path", help="netCDF file with a `layer` dimension")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--metrics", nargs="+", default=["nc1", "nc2"], help="variables to draw")
    parser.add_argument(
        "--stage", default="input", help="Deep RFM stage to draw (input, projected, features)"
    )
    parser.set_defaults(run=_run_plot, verbose=False)


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


def _run_collapse(args: argparse.Namespace) -> None:
    from deeprfm.deep import DeepRFM

    X_train, y_train = _load_split(args, "train", args.n_train)
    X_test, y_test = _load_split(args, "test", args.n_test)
    model = DeepRFM(
        layers=args.layers,
        width=args.width,
        feature_map=args.feature_map,
        bandwidth=args.bandwidth,
        reg=args.reg,
        device=args.device,
        random_state=args.seed,
        verbose=True,
    )
    print(
        f"Deep RFM on {args.dataset}: {len(X_train)} train / {len(X_test)} test points, "
        f"{X_train.shape[1]} features, {args.layers} layers of width {args.width}"
    )
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    collapse = model.collapse_
    entering = collapse.sel(stage="input")
    seconds = collapse.rfm_seconds + collapse.map_seconds + collapse.collapse_seconds
    print_table(
        ["layer", "train acc", "test acc", "NC1", "NC2", "seconds"],
        [
            [int(layer), *(float(v) for v in values)]
            for layer, *values in zip(
                collapse.layer.values,
                collapse.train_acc.values,
                collapse.eval_acc.values,
                entering.nc1.values,
                entering.nc2.values,
                seconds.values,
                strict=True,
            )
        ],
    )
    if args.out:
        collapse.to_netcdf(args.out)
        print(f"collapse dataset written to {args.out}")
    if args.plot:
        _save_plot(entering, ["nc1", "nc2"], args.plot)


def _run_plot(args: argparse.Namespace) -> None:
    import xarray as xr

    with xr.open_dataset(args.path) as data:
        data = data.load()
    if "layer" not in data.dims:
        raise ValueError(f"{args.path} has no `layer` dimension to plot along")
    if "stage" in data.dims:
        data = data.sel(stage=args.stage)
    missing = [m for m in args.metrics if m not in data]
    if missing:
        raise ValueError(f"metrics {missing} not in {args.path}; it holds {sorted(data)}")
    _save_plot(data, args.metrics, args.out)


def _save_plot(data, metrics: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from analysis import plot_collapse

    ax = plot_collapse(data, metrics=tuple(metrics))
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    print(f"collapse curves written to {path}")


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
    _add_collapse_parser(subparsers)
    _add_plot_parser(subparsers)
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
