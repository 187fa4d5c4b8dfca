"""Modular arithmetic data, and RFM grokking it (Mallinar et al. 2024) with the paper's settings."""

import numpy as np
import pytest
import torch

from deeprfm import RFMClassifier
from deeprfm.data import MODULAR_OPERATIONS, modular_arithmetic

#: The grokking paper's RFM: Gaussian kernel, L = 2.5, no ridge, mean-centred gradients,
#: M = AGOP^{1/2}, not normalised (docs/grokking.md).
PAPER_RFM = {
    "kernel": "gaussian",
    "bandwidth": 2.5,
    "reg": 0.0,
    "centering": True,
    "agop_power": 0.5,
    "normalize": None,
    "dtype": torch.float64,
    "device": "cpu",
}


#: What the label y of (a, b) satisfies, per operation (division: y·b = a).
LABEL_CHECKS = {
    "add": lambda a, b, y, p: y == (a + b) % p,
    "sub": lambda a, b, y, p: y == (a - b) % p,
    "mul": lambda a, b, y, p: y == (a * b) % p,
    "div": lambda a, b, y, p: (y * b) % p == a,
}


def operands(X: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    return X[:, :p].argmax(axis=1), X[:, p:].argmax(axis=1)


@pytest.mark.parametrize("op", MODULAR_OPERATIONS)
def test_inputs_are_one_hot_pairs_and_labels_the_operation(op):
    p = 7
    X_train, X_test, y_train, y_test = modular_arithmetic(p, op=op, random_state=0)
    X, y = np.vstack([X_train, X_test]), np.concatenate([y_train, y_test])
    a, b = operands(X, p)
    assert X.dtype == np.float64 and y.dtype == np.int64 and X.shape[1] == 2 * p
    np.testing.assert_array_equal(X.sum(axis=1), 2.0)
    np.testing.assert_array_equal(X[:, :p].sum(axis=1), 1.0)
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    divisors = range(1, p) if op == "div" else range(p)
    assert pairs == {(i, j) for i in range(p) for j in divisors}  # every pair, once
    assert LABEL_CHECKS[op](a, b, y, p).all()


def test_split_sizes_and_reproducibility():
    p = 11
    first = modular_arithmetic(p, train_fraction=0.3, random_state=5)
    assert len(first.y_train) == round(0.3 * p * p) and len(first.y_test) == p * p - 36
    again = modular_arithmetic(p, train_fraction=0.3, random_state=5)
    for mine, theirs in zip(first, again, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    other = modular_arithmetic(p, train_fraction=0.3, random_state=6)
    assert not np.array_equal(first.X_train, other.X_train)
    tiny = modular_arithmetic(2, train_fraction=0.01, random_state=0)
    assert (len(tiny.y_train), len(tiny.y_test)) == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"p": 7.0}, TypeError, "p must be an int"),
        ({"p": True}, TypeError, "p must be an int"),
        ({"p": 1}, ValueError, "p must be >= 2"),
        ({"p": 9, "op": "div"}, ValueError, "p must be prime for op='div'"),
        ({"p": 7, "op": "pow"}, ValueError, "op must be one of"),
        ({"p": 7, "op": None}, TypeError, "op must be a str"),
        ({"p": 7, "train_fraction": 1.0}, ValueError, r"train_fraction must be in \(0, 1\)"),
        ({"p": 7, "train_fraction": 0}, ValueError, r"train_fraction must be in \(0, 1\)"),
        ({"p": 7, "train_fraction": "half"}, TypeError, "train_fraction must be a number"),
        ({"p": 7, "random_state": 1.5}, TypeError, "random_state must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        modular_arithmetic(**kwargs)


def test_rfm_groks_modular_addition():
    # p = 23 keeps the test to seconds; at this p half of the pairs are too few to grok in
    # 12 iterations (docs/grokking.md), 70 % are enough
    p, iters = 23, 12
    X_train, X_test, y_train, y_test = modular_arithmetic(p, train_fraction=0.7, random_state=0)
    model = RFMClassifier(iters=iters, early_stopping=False, **PAPER_RFM)
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    train_acc = model.history_["train_acc"].values
    test_acc = model.history_["eval_acc"].values
    np.testing.assert_array_equal(train_acc, 1.0)  # interpolated throughout
    assert test_acc[:6].max() <= 2 / p  # no better than chance for several iterations,
    assert test_acc[-1] >= 0.9  # then it generalises
    # the a–b block of M is circulant: M[i, p + j] is a function of (i − j) mod p
    block = model.M_[:p, p:]
    diagonal = np.subtract.outer(np.arange(p), np.arange(p)) % p
    circulant = np.array([block[diagonal == k].mean() for k in range(p)])[diagonal]
    assert ((block - circulant) ** 2).sum() <= 0.1 * ((block - block.mean()) ** 2).sum()
