"""The ``deeprfm`` command line: fit models on local datasets and print their tables.

Every sub-command answers ``--help``; bad arguments exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

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
    _add_overwrite_argument(parser)
    parser.add_argument("--verbose", action="store_true", help="progress bars and log messages")


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist"
    )


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
    parser.add_argument(
        "--normalize-rows",
        default="every_layer",
        choices=["every_layer", "input", "none"],
        help="scale rows to unit norm on entering every layer, the first only, or never",
    )
    parser.add_argument(
        "--targets", default="onehot", choices=["onehot", "pm1"], help="class codes regressed"
    )
    parser.add_argument("--plot", default=None, help="write the collapse curves to this PNG")
    _add_run_arguments(parser)
    parser.set_defaults(run=_run_collapse)


def _add_probe_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="measure NFM, AGOP, NFA correlation and collapse of a network's layers",
        description="Build a torchvision or timm architecture by name, load a state-dict file "
        "(read with torch.load(weights_only=True)), measure every selected Linear/Conv2d "
        "layer on a dataset split and print a per-layer table; --out writes the DataTree.",
    )
    parser.add_argument("--arch", required=True, help="architecture name, e.g. resnet18")
    parser.add_argument("--source", default="torchvision", choices=["torchvision", "timm"])
    parser.add_argument(
        "--weights", default=None, help="state-dict file (default: the untrained architecture)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="output classes (default: the dataset's)"
    )
    _add_data_arguments(parser)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--n", type=int, default=None, help="class-balanced subsample size")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--layers", nargs="+", default=None, help="layer names (default: all)")
    parser.add_argument(
        "--agop-outputs", default="exact", help="'exact' or a number of random projections"
    )
    parser.add_argument(
        "--flatten", action="store_true", help="feed flat vectors (for MLP architectures)"
    )
    _add_run_arguments(parser)
    parser.set_defaults(run=_run_probe)


def _add_plot_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw collapse curves from a saved netCDF file",
        description="Draw collapse curves (metrics against layer, log scale) from a netCDF "
        "file written by `deeprfm collapse --out` or `deeprfm probe --out`.",
    )
    parser.add_argument("path", help="netCDF file with a `layer` dimension")
    parser.add_argument("--out", required=True, help="PNG file to write")
    _add_overwrite_argument(parser)
    parser.add_argument("--metrics", nargs="+", default=["nc1", "nc2"], help="variables to draw")
    parser.add_argument(
        "--stage", default="input", help="Deep RFM stage to draw (input, projected, features)"
    )
    parser.set_defaults(run=_run_plot, verbose=False)


def _load_split(args: argparse.Namespace, split: str, n: int | None):
    from deeprfm.data import load_dataset

    return load_dataset(args.dataset, root=args.root, split=split, n=n, random_state=args.seed)


def _load_splits(args: argparse.Namespace):
    """Training and test splits; the training subset must hold every class of the test one."""
    X_train, y_train = _load_split(args, "train", args.n_train)
    X_test, y_test = _load_split(args, "test", args.n_test)
    missing = np.setdiff1d(y_test, y_train)
    if len(missing):
        raise ValueError(
            f"--n-train {args.n_train}: the training subset holds {len(np.unique(y_train))} of "
            f"the {len(np.unique(y_test))} classes (missing {missing[:5].tolist()}); use a "
            "larger --n-train"
        )
    return X_train, X_test, y_train, y_test


def _run_rfm(args: argparse.Namespace) -> None:
    from deeprfm.rfm import RFMClassifier

    X_train, X_test, y_train, y_test = _load_splits(args)
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
                history.eval_acc.values,
                history.seconds.values,
                strict=True,
            )
        ],
    )
    if args.out:
        history.rename(eval_acc="test_acc", eval_mse="test_mse").to_netcdf(args.out)
        print(f"history written to {args.out}")


def _run_collapse(args: argparse.Namespace) -> None:
    from deeprfm.deep import DeepRFM
    from deeprfm.rfm import RFMClassifier

    X_train, X_test, y_train, y_test = _load_splits(args)
    model = DeepRFM(
        layer=RFMClassifier(bandwidth=args.bandwidth, reg=args.reg, iters=1, targets=args.targets),
        layers=args.layers,
        width=args.width,
        feature_map=args.feature_map,
        normalize_rows=None if args.normalize_rows == "none" else args.normalize_rows,
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


def _build_model(args: argparse.Namespace, num_classes: int):
    import torch

    if args.source == "timm":
        import timm

        if not timm.is_model(args.arch):
            raise ValueError(f"--arch {args.arch!r} is not a timm model")
        model = timm.create_model(args.arch, pretrained=False, num_classes=num_classes)
    else:
        import torchvision

        if args.arch not in torchvision.models.list_models():
            raise ValueError(f"--arch {args.arch!r} is not a torchvision model")
        model = torchvision.models.get_model(args.arch, weights=None, num_classes=num_classes)
    if args.weights is not None:
        if not Path(args.weights).is_file():
            raise FileNotFoundError(f"--weights {args.weights}: no such file")
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for files it refuses
            raise ValueError(
                f"--weights {args.weights}: not a state-dict file that loads without running "
                f"code ({_error_summary(err)})"
            ) from err
        model.load_state_dict(state)
    return model


def _run_probe(args: argparse.Namespace) -> None:
    import torch

    from deeprfm.data import load_dataset
    from deeprfm.probes import NeuralProbe

    outputs = args.agop_outputs if args.agop_outputs == "exact" else _positive_int(args)
    X, y = load_dataset(
        args.dataset,
        root=args.root,
        split=args.split,
        n=args.n,
        flatten=args.flatten,
        random_state=args.seed,
    )
    model = _build_model(args, args.num_classes or int(y.max()) + 1)
    inputs = torch.as_tensor(X)
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if not args.flatten and first_conv is not None and inputs.shape[1] < first_conv.in_channels:
        inputs = inputs.expand(-1, first_conv.in_channels, -1, -1)  # grey to RGB
    probe = NeuralProbe(
        model,
        layers=args.layers or "auto",
        agop_outputs=outputs,
        device=args.device,
        random_state=args.seed,
        verbose=True,
    )
    batches = [
        (inputs[i : i + args.batch_size], torch.as_tensor(y[i : i + args.batch_size]))
        for i in range(0, len(y), args.batch_size)
    ]
    with probe:
        tree = probe.measure(batches)
    root = tree.to_dataset().sel(stage="input")
    print(f"{args.arch} ({args.source}) on {len(y)} {args.dataset} {args.split} samples")
    print_table(
        ["layer", "type", "fan_in", "nfa_corr", "NC1", "NC2"],
        [
            [str(name), str(kind), int(fan_in), float(corr), float(nc1), float(nc2)]
            for name, kind, fan_in, corr, nc1, nc2 in zip(
                root.layer.values,
                root.layer_type.values,
                root.fan_in.values,
                root.nfa_corr.values,
                root.nc1.values,
                root.nc2.values,
                strict=True,
            )
        ],
    )
    if args.out:
        tree.to_netcdf(args.out, engine="h5netcdf")
        print(f"probe DataTree written to {args.out}")


def _positive_int(args: argparse.Namespace) -> int:
    try:
        value = int(args.agop_outputs)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"--agop-outputs must be 'exact' or a positive int, got {args.agop_outputs!r}"
        )
    return value


def _run_plot(args: argparse.Namespace) -> None:
    import xarray as xr

    if not Path(args.path).is_file():
        raise FileNotFoundError(f"{args.path}: no such file")

    with xr.open_dataset(args.path) as data:
        data = data.load()
    if "layer" not in data.dims:
        raise ValueError(f"{args.path} has no `layer` dimension to plot along")
    if "stage" in data.dims:
        stages = [str(stage) for stage in data.stage.values]
        if args.stage not in stages:
            raise ValueError(f"--stage {args.stage!r}: {args.path} has the stages {stages}")
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
    _add_probe_parser(subparsers)
    _add_plot_parser(subparsers)
    return parser


#: Errors the user can act on (bad arguments, files, devices, memory): exit status 2.
_USER_ERRORS = (ValueError, TypeError, OSError, MemoryError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Every failure prints one line on stderr: status 2 for bad arguments, files, devices and
    memory, 1 for anything else.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        _check_outputs(args)
        _check_device(args)
        args.run(args)
    except _USER_ERRORS as err:
        parser.exit(2, f"deeprfm {args.command}: error: {_first_line(err)}\n")
    except Exception as err:  # never a traceback: one line, and a status that says it failed
        parser.exit(1, f"deeprfm {args.command}: internal error: {_first_line(err)}\n")
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _error_summary(err: BaseException) -> str:
    """``Type: first line`` of an exception, or its type alone when it has no message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work: every output file can be written, and replaces none unasked."""
    for option in ("out", "plot"):
        path = getattr(args, option, None)
        if path is None:
            continue
        path = Path(path)
        flag = f"--{option} {path}"
        if path.is_dir():
            raise ValueError(f"{flag} is a directory")
        if path.exists() and not args.overwrite:
            raise ValueError(f"{flag} exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise ValueError(f"{flag}: the folder {path.parent} does not exist")
        existed = path.exists()
        try:
            with open(path, "ab" if existed else "xb"):
                pass
        except OSError as err:
            raise ValueError(f"{flag} cannot be written ({err.strerror or err})") from err
        if not existed:
            path.unlink()


def _check_device(args: argparse.Namespace) -> None:
    if getattr(args, "device", None) is None:
        return
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {args.device!r} is not a torch device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available")


if __name__ == "__main__":
    sys.exit(main())
