"""Deep neural collapse in a Deep RFM: within-class variability shrinks layer by layer.

Fits ``DeepRFM(layers=5, width=1024)`` on the training split of scikit-learn's digits with the
test split as ``eval_set`` (3 layers of width 256 on 600 training images in small mode) and
prints, per layer, the train and test accuracy of the layer's RFM and the collapse of the
training features *entering* the layer (stage ``"input"`` of ``model.collapse_``):

* ``nc1`` — (1/K) tr(Σ_W Σ_B^†), Papyan et al.'s NC1,
* ``nc1_trace`` — tr Σ_W / tr Σ_B, the NC1 of the Deep RFM paper (Beaglehole et al. 2024),
* ``nc2`` — distance of the centred class means to a simplex ETF.

It writes to ``--out`` (default: a fresh temporary folder):

* ``collapse.nc`` — the whole ``model.collapse_`` Dataset (dims ``layer`` × ``stage``, also the
  ``eval_*`` metrics of the test features), readable with ``xarray.open_dataset`` or plotted by
  ``deeprfm plot``,
* ``collapse_curves.png`` — those three metrics against the layer, log scale.

Run ``python examples/deep_rfm_collapse.py [--small] [--out DIR]``; ``DEEPRFM_SMALL=1`` is the
same as ``--small`` (under 30 s on two CPU cores).
"""

from __future__ import annotations

import argparse

import matplotlib
import xarray as xr
from _example import example_parser, output_dir

from analysis import plot_collapse
from deeprfm import DeepRFM
from deeprfm.data import load_dataset

#: (layers, width, training subsample) of each mode.
NORMAL = (5, 1024, None)
SMALL = (3, 256, 600)
METRICS = ("nc1", "nc1_trace", "nc2")


def parse_args() -> argparse.Namespace:
    """Command-line arguments: ``--small``, ``--out`` and ``--seed``."""
    parser = example_parser(__doc__)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = output_dir(args.out, "deep_rfm_collapse_")
    layers, width, n_train = SMALL if args.small else NORMAL

    X_train, y_train = load_dataset("digits", split="train", n=n_train, random_state=args.seed)
    X_test, y_test = load_dataset("digits", split="test")
    print(
        f"Deep RFM, {layers} layers of width {width}, on {len(X_train)} training and "
        f"{len(X_test)} test images of digits"
    )
    model = DeepRFM(layers=layers, width=width, random_state=args.seed)
    model.fit(X_train, y_train, eval_set=(X_test, y_test))

    entering = model.collapse_.sel(stage="input")
    table = xr.merge(
        [model.collapse_[["train_acc", "eval_acc"]], entering[list(METRICS)].drop_vars("stage")]
    )
    print(table.to_dataframe().to_string(float_format="{:.4f}".format))
    print(f"test accuracy of the last layer: {float(model.collapse_.eval_acc[-1]):.4f}\n")

    model.collapse_.to_netcdf(out / "collapse.nc")
    matplotlib.use("Agg")
    ax = plot_collapse(entering, metrics=METRICS)
    ax.set_title("Deep RFM on digits: collapse of the features entering each layer")
    ax.figure.savefig(out / "collapse_curves.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'collapse.nc'} and {out / 'collapse_curves.png'}")


if __name__ == "__main__":
    main()
