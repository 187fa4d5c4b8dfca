"""Class labels of a classifier and the regression codes (targets) it fits to them."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.multiclass import check_classification_targets

__all__ = [
    "TARGET_CODES",
    "check_classes",
    "check_targets",
    "class_codes",
    "decision_scores",
    "encode_labels",
    "known_labels",
]

#: Regression codes of the classes a classifier can fit (``targets=``).
TARGET_CODES = ("onehot", "pm1")


def check_targets(targets: str) -> None:
    """Raise ValueError unless ``targets`` names a class coding of :data:`TARGET_CODES`."""
    if not isinstance(targets, str) or targets not in TARGET_CODES:
        raise ValueError(f"targets must be one of {TARGET_CODES}, got {targets!r}")


def check_classes(classes: list) -> np.ndarray:
    """The class labels of a model file: a list of at least two distinct, sorted labels."""
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError(f"classes must be a list of at least 2 labels, got {classes!r}")
    labels = np.array(classes)
    if len(np.unique(labels)) != len(labels) or not np.array_equal(np.sort(labels), labels):
        raise ValueError("classes must be distinct and sorted")
    return labels


def class_codes(labels: np.ndarray, n_classes: int, targets: str = "onehot") -> np.ndarray:
    """Regression targets of class indices.

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
        Class indices in ``0 … n_classes − 1``.
    n_classes : int
    targets : {"onehot", "pm1"}
        ``"onehot"``: 1 in the class's column, 0 elsewhere; ``"pm1"``: +1 and −1 (the Deep RFM
        paper's codes, ``2·onehot − 1``).

    Returns
    -------
    ndarray of float64, shape (n, n_classes)
    """
    onehot = np.eye(n_classes)[labels]
    return 2 * onehot - 1 if targets == "pm1" else onehot


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes of training labels and each label's index among them.

    Parameters
    ----------
    y : ndarray, shape (n,)
        Labels of any type (ints, strings).

    Returns
    -------
    classes : ndarray, shape (K,)
        The sorted distinct labels, K ≥ 2.
    indices : ndarray of int, shape (n,)

    Raises
    ------
    ValueError
        ``y`` is not a classification target, or holds a single class.
    """
    check_classification_targets(y)
    classes, indices = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"y must contain samples of at least 2 classes, got 1 class: {classes[0]!r}"
        )
    return classes, indices


def known_labels(y: np.ndarray, classes: np.ndarray, name: str = "eval_set y") -> np.ndarray:
    """Indices of labels ``y`` among ``classes``; ValueError naming ``name`` for unseen ones."""
    unseen = np.setdiff1d(y, classes)
    if len(unseen):
        raise ValueError(f"{name} has labels not seen in y: {unseen[:5].tolist()}")
    return np.searchsorted(classes, y)


def decision_scores(outputs: torch.Tensor) -> np.ndarray:
    """A classifier's ``decision_function`` from its outputs, as scikit-learn's classifiers.

    Parameters
    ----------
    outputs : torch.Tensor, shape (n, K)
        The regression outputs, one column per class.

    Returns
    -------
    ndarray of float64, shape (n, K), or (n,) for K = 2: ``outputs[:, 1] − outputs[:, 0]``,
    positive where the second class wins.
    """
    scores = outputs.cpu().numpy().astype(np.float64)
    return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores
