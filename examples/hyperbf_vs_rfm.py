"""RFM, HyperBF-AGOP and HyperBF-GD on digits: Gan & Poggio's Table 1 on data that runs here.

Gan & Poggio (CBMM memo 148, 2024) compare three ways of learning the metric M of a Gaussian
kernel predictor: an RFM (kernel ridge regression on all training points, M ← AGOP), a HyperBF
network with fixed centres whose M is updated by the AGOP (``metric_update="agop"``), and a
HyperBF network trained by gradient descent on its coefficients, centres and metric factor W
(``metric_update="gd"``). This script fits the three on scikit-learn's digits (standardised,
the library's fixed 75/25 split), all with the same Gaussian bandwidth, and prints

* test accuracy, training accuracy and fit seconds of each model,
* the Pearson correlation of the flattened learned matrices M between every pair of models
  (``analysis.nfa_correlation`` with power 1),
* for each model, the correlation of its M with the AGOP of its own fitted predictor over the
  training points (``deeprfm.kernel_agop`` with the model's centres): how close the learned
  metric is to a fixed point of the AGOP update (the Neural Feature Ansatz).

It writes to ``--out`` (default: a fresh temporary folder):

* ``results.csv`` — the first and third tables, one row per model,
* ``correlations.csv`` — the pairwise correlations,
* ``metrics.nc`` — the three learned matrices M (dims ``model``, ``row``, ``column``).

Run ``python examples/hyperbf_vs_rfm.py [--small] [--out DIR] [--seed S]``; ``DEEPRFM_SMALL=1``
is the same as ``--small`` (600 training images, fewer epochs: a few seconds). The full run
takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import xarray as xr
from _example import example_parser, output_dir
from sklearn.preprocessing import StandardScaler

from analysis import nfa_correlation
from deeprfm import HyperBFClassifier, RFMClassifier, kernel_agop
from deeprfm.data import load_dataset


@dataclass(frozen=True)
class Setting:
    """The sizes of one mode of the script."""

    n_train: int | None  # training images (None: all 1347)
    n_centres: int  # centres of the two HyperBF networks
    agop_steps: int  # AGOP updates of the RFM and of HyperBF-AGOP
    gd_epochs: int  # passes of HyperBF-GD over the training set


NORMAL = Setting(n_train=None, n_centres=500, agop_steps=5, gd_epochs=50)
SMALL = Setting(n_train=600, n_centres=200, agop_steps=2, gd_epochs=10)
#: Gaussian bandwidth L of all three models, in the units of the standardised pixels.
BANDWIDTH = 4.0


def parse_args() -> argparse.Namespace:
    """Command-line arguments: ``--small``, ``--out`` and ``--seed``."""
    return example_parser(__doc__).parse_args()


def models(setting: Setting, seed: int) -> dict:
    """The three estimators, Gaussian kernels of one bandwidth."""
    hyperbf = {"bandwidth": BANDWIDTH, "n_centres": setting.n_centres, "random_state": seed}
    return {
        "RFM": RFMClassifier(
            kernel="gaussian",
            bandwidth=BANDWIDTH,
            iters=setting.agop_steps,
            early_stopping=False,
            random_state=seed,
        ),
        "HyperBF-AGOP": HyperBFClassifier(
            metric_update="agop", epochs=setting.agop_steps, **hyperbf
        ),
        "HyperBF-GD": HyperBFClassifier(metric_update="gd", epochs=setting.gd_epochs, **hyperbf),
    }


def own_agop(model, X: np.ndarray) -> np.ndarray:
    """The AGOP of a fitted model's predictor over the points X (closed form)."""
    if isinstance(model, RFMClassifier):
        centres, coef = model.X_fit_.cpu(), torch.from_numpy(model.alpha_)
    else:
        centres, coef = torch.from_numpy(model.centres_), torch.from_numpy(model.coef_)
    return kernel_agop(
        model.kernel_,
        centres.double(),
        coef,
        torch.from_numpy(model.M_),
        torch.from_numpy(np.asarray(X, dtype=np.float64)),
    ).numpy()


def main() -> None:
    args = parse_args()
    out = output_dir(args.out, "hyperbf_vs_rfm_")
    setting = SMALL if args.small else NORMAL
    X_train, y_train = load_dataset("digits", split="train", n=setting.n_train, random_state=0)
    X_test, y_test = load_dataset("digits", split="test")
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)

    rows, matrices = [], {}
    for name, model in models(setting, args.seed).items():
        start = time.perf_counter()
        model.fit(X_train, y_train)
        seconds = time.perf_counter() - start
        matrices[name] = model.M_
        rows.append(
            {
                "model": name,
                "test_acc": model.score(X_test, y_test),
                "train_acc": model.score(X_train, y_train),
                "fit_seconds": seconds,
                "corr(M, own AGOP)": nfa_correlation(model.M_, own_agop(model, X_train), 1.0),
            }
        )
    results = pd.DataFrame(rows).set_index("model")
    pairs = pd.DataFrame(
        [
            {"model A": a, "model B": b, "pearson(M_A, M_B)": nfa_correlation(A, B, 1.0)}
            for (a, A), (b, B) in itertools.combinations(matrices.items(), 2)
        ]
    )
    print(
        f"digits, {len(X_train)} training / {len(X_test)} test images, Gaussian kernels "
        f"L = {BANDWIDTH}, HyperBF with {setting.n_centres} centres:"
    )
    print(results.to_string(float_format="{:.4f}".format))
    print("\nPearson correlation of the flattened learned metrics M:")
    print(pairs.to_string(index=False, float_format="{:.3f}".format))

    results.to_csv(out / "results.csv")
    pairs.to_csv(out / "correlations.csv", index=False)
    stacked = np.stack(list(matrices.values()))
    xr.Dataset(
        {
            "M": (
                ("model", "row", "column"),
                stacked,
                {"long_name": "learned metric", "definition": "M_ of each fitted model"},
            )
        },
        coords={"model": list(matrices)},
    ).to_netcdf(out / "metrics.nc")
    print(f"\nwrote results.csv, correlations.csv and metrics.nc to {out}")


if __name__ == "__main__":
    main()
