"""Choose an RFM's bandwidth and ridge by cross-validation, then look at what it learned.

`RFMClassifier` is a scikit-learn estimator, so `GridSearchCV` tunes it like any other. This
script searches bandwidth × reg on the training split of scikit-learn's digits (shuffled
stratified 5-fold CV; a 2 × 1 grid with 3 folds in small mode), refits the best setting on the
whole training split with the test split as ``eval_set`` (scored at every iteration but not used
to choose one: ``early_stopping=False``), and prints

* the cross-validation table (mean and std of the fold accuracies, fit seconds),
* the refitted model's per-iteration ``history_`` (train/test accuracy, seconds),
* its test accuracy.

It writes to ``--out`` (default: a fresh temporary folder):

* ``history.nc`` — the ``history_`` Dataset (netCDF),
* ``m_diagonal.png`` — the diagonal of the learned feature matrix ``M_`` as an 8 × 8 image: the
  pixels the classifier is most sensitive to.

Run ``python examples/rfm_digits_grid_search.py [--small] [--out DIR]``; ``DEEPRFM_SMALL=1``
is the same as ``--small`` (a training subsample of 600 images, under 30 s on two CPU cores).
"""

from __future__ import annotations

import argparse

import matplotlib
import numpy as np
import pandas as pd
from _example import example_parser, output_dir
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from analysis import plot_matrix
from deeprfm import RFMClassifier
from deeprfm.data import load_dataset

#: (param_grid, folds, AGOP iterations, training subsample) of each mode.
NORMAL = ({"bandwidth": [1.0, 3.0, 10.0, 30.0], "reg": [1e-4, 1e-3, 1e-2]}, 5, 3, None)
SMALL = ({"bandwidth": [3.0, 10.0], "reg": [1e-3]}, 3, 2, 600)


def parse_args() -> argparse.Namespace:
    """Command-line arguments: ``--small``, ``--out`` and ``--seed``."""
    parser = example_parser(__doc__)
    return parser.parse_args()


def grid_search(
    X: np.ndarray, y: np.ndarray, grid: dict, folds: int, iters: int, seed: int
) -> GridSearchCV:
    """Cross-validate an `RFMClassifier` over ``grid`` (no refit) and print the table."""
    # The digits splits keep the file order, which groups the writers: shuffled folds.
    search = GridSearchCV(
        RFMClassifier(iters=iters, early_stopping=False, random_state=seed),
        grid,
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        refit=False,
    )
    search.fit(X, y)
    results = pd.DataFrame(search.cv_results_)
    table = (
        results[
            ["param_bandwidth", "param_reg", "mean_test_score", "std_test_score", "mean_fit_time"]
        ]
        .rename(columns=lambda name: name.removeprefix("param_"))
        .sort_values("mean_test_score", ascending=False)
    )
    print(f"{folds}-fold cross-validation accuracy on {len(X)} training images:")
    print(table.to_string(index=False, float_format="{:.4f}".format))
    print(f"best: {search.best_params_} (CV accuracy {search.best_score_:.4f})\n")
    return search


def main() -> None:
    args = parse_args()
    out = output_dir(args.out, "rfm_digits_")
    grid, folds, iters, n_train = SMALL if args.small else NORMAL

    X_train, y_train = load_dataset("digits", split="train", n=n_train, random_state=args.seed)
    X_test, y_test = load_dataset("digits", split="test")
    search = grid_search(X_train, y_train, grid, folds, iters, args.seed)

    model = RFMClassifier(
        iters=iters, early_stopping=False, random_state=args.seed, **search.best_params_
    )
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    history = model.history_.rename(eval_acc="test_acc", eval_mse="test_mse")
    print("best setting refitted on the training split, per RFM iteration:")
    table = history[["train_acc", "test_acc", "test_mse", "seconds"]].to_dataframe()
    print(table.to_string(float_format="{:.4f}".format))
    print(f"test accuracy: {model.score(X_test, y_test):.4f}\n")

    history.to_netcdf(out / "history.nc")
    matplotlib.use("Agg")
    side = int(np.sqrt(model.n_features_in_))
    ax = plot_matrix(
        np.diag(model.M_).reshape(side, side), title="diagonal of M (pixel importance)"
    )
    ax.figure.savefig(out / "m_diagonal.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'history.nc'} and {out / 'm_diagonal.png'}")


if __name__ == "__main__":
    main()
