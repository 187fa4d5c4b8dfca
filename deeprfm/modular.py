"""Modular arithmetic tasks: (a ∘ b) mod p from one-hot operand pairs, split at random.

The setting in which RFMs grok (Mallinar et al. 2024, "Emergence in non-neural models: grokking
modular arithmetic via average gradient outer product", arXiv 2407.20199): every pair (a, b) of
residues is one sample, its input the concatenation of the one-hot codes of a and b (2p
features), its label the residue (a ∘ b) mod p; a random fraction of the pairs trains, the rest
tests. Re-exported by :mod:`deeprfm.data`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from deeprfm._validation import numpy_generator

__all__ = ["MODULAR_OPERATIONS", "ModularSplit", "modular_arithmetic"]

#: Operations accepted by `modular_arithmetic`.
MODULAR_OPERATIONS: tuple[str, ...] = ("add", "sub", "mul", "div")


class ModularSplit(NamedTuple):
    """A train/test split of a modular arithmetic task (unpacks like ``train_test_split``).

    Attributes
    ----------
    X_train : numpy.ndarray of float64, shape (n_train, 2p)
        Concatenated one-hot codes of the training pairs (a, b): column a and column p + b are 1.
    X_test : numpy.ndarray of float64, shape (n_test, 2p)
        The same for the held-out pairs.
    y_train : numpy.ndarray of int64, shape (n_train,)
        (a ∘ b) mod p of the training pairs.
    y_test : numpy.ndarray of int64, shape (n_test,)
        (a ∘ b) mod p of the held-out pairs.
    """

    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    return all(p % divisor for divisor in range(2, int(p**0.5) + 1))


def _check_args(p: object, op: object, train_fraction: object) -> None:
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)):
        raise TypeError(f"p must be an int, got {p!r}")
    if p < 2:
        raise ValueError(f"p must be >= 2, got {p}")
    if not isinstance(op, str):
        raise TypeError(f"op must be a str, one of {MODULAR_OPERATIONS}; got {op!r}")
    if op not in MODULAR_OPERATIONS:
        raise ValueError(f"op must be one of {MODULAR_OPERATIONS}; got {op!r}")
    if op == "div" and not _is_prime(int(p)):
        raise ValueError(f"p must be prime for op='div' (every b != 0 invertible), got {p}")
    if isinstance(train_fraction, (bool, np.bool_)) or not isinstance(
        train_fraction, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"train_fraction must be a number in (0, 1), got {train_fraction!r}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")


def _operands_and_labels(p: int, op: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (a, b) in row-major order (b ≠ 0 for ``div``) and their labels."""
    first = 1 if op == "div" else 0
    a, b = (grid.ravel() for grid in np.meshgrid(np.arange(p), np.arange(first, p), indexing="ij"))
    if op == "add":
        labels = a + b
    elif op == "sub":
        labels = a - b
    elif op == "mul":
        labels = a * b
    else:
        inverse = np.array([0] + [pow(value, -1, p) for value in range(1, p)])
        labels = a * inverse[b]
    return a, b, np.mod(labels, p).astype(np.int64)


def modular_arithmetic(
    p: int,
    op: str = "add",
    train_fraction: float = 0.5,
    random_state: int | np.random.Generator | None = None,
) -> ModularSplit:
    """The task (a ∘ b) mod p on one-hot pairs, split at random into train and test.

    Parameters
    ----------
    p : int
        Modulus, ≥ 2; prime for ``op="div"``. The task has p² samples (p(p − 1) for ``div``) of
        2p features and p classes.
    op : {"add", "sub", "mul", "div"}, default "add"
        a + b, a − b, a·b, or a·b⁻¹ (b ≠ 0, b⁻¹ the inverse of b mod p).
    train_fraction : float in (0, 1), default 0.5
        Fraction of the pairs that train (rounded to the nearest count, at least one pair in
        each split); the paper's setting is 0.5.
    random_state : int, numpy.random.Generator or None
        Seed or generator of the split; ``None`` draws a fresh one.

    Returns
    -------
    ModularSplit
        ``(X_train, X_test, y_train, y_test)``: float64 one-hot inputs (n, 2p) and int64 labels
        in 0 … p − 1, each split in row-major order of (a, b).

    Raises
    ------
    TypeError
        An argument of the wrong type.
    ValueError
        ``p`` < 2 (or not prime for ``div``), an unknown ``op``, ``train_fraction`` outside
        (0, 1).

    Examples
    --------
    >>> X_train, X_test, y_train, y_test = modular_arithmetic(5, random_state=0)
    >>> X_train.shape, X_test.shape
    ((12, 10), (13, 10))
    >>> a, b = X_train[0, :5].argmax(), X_train[0, 5:].argmax()
    >>> bool(y_train[0] == (a + b) % 5)
    True
    """
    _check_args(p, op, train_fraction)
    rng = numpy_generator(random_state)
    p = int(p)
    a, b, labels = _operands_and_labels(p, op)
    n = len(labels)
    n_train = min(max(round(train_fraction * n), 1), n - 1)
    train = np.zeros(n, dtype=bool)
    train[rng.choice(n, size=n_train, replace=False)] = True
    X = np.zeros((n, 2 * p))
    rows = np.arange(n)
    X[rows, a] = 1.0
    X[rows, p + b] = 1.0
    return ModularSplit(X[train], X[~train], labels[train], labels[~train])
