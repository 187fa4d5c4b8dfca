"""Checks of user input shared by the estimators; every error names the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_consistent_length, validate_data


def as_numpy(data):
    """Torch tensors to numpy (host copy if needed); anything else unchanged."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    return data


def to_tensor(
    array: np.ndarray, device: torch.device, dtype: torch.dtype, *, copy: bool = False
) -> torch.Tensor:
    """A numpy array as a tensor on ``device`` with ``dtype``.

    With ``copy=False`` it shares memory with ``array`` when it can (callers never modify it
    in place; use it for data a call reads and drops); ``copy=True`` always returns a tensor of
    its own, for what a fitted model keeps. A read-only array is copied, as torch tensors
    cannot be read-only.
    """
    array = np.asarray(array)
    if copy or not array.flags.writeable:
        return torch.tensor(array, dtype=dtype, device=device)
    return torch.as_tensor(array, dtype=dtype, device=device)


def check_number(
    value,
    name: str,
    *,
    integer: bool = False,
    low: float | None = None,
    low_inclusive: bool = True,
    high: float | None = None,
) -> None:
    """Raise TypeError/ValueError unless ``value`` is a (n integer) number in [low, high]
    (above ``low`` when ``low_inclusive=False``); the messages name ``name``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        relation = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {relation} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


# -- declarative parameter tables ------------------------------------------------------------
# An estimator lists its hyper-parameters with one constraint each (as scikit-learn's
# ``_parameter_constraints``) and validates them all in ``fit`` with :func:`check_params`.


@dataclass(frozen=True)
class Number:
    """A real (``integer=True``: integral) number in [low, high] (``low_inclusive=False``: above
    ``low``); ``optional=True`` also admits None."""

    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    integer: bool = False
    optional: bool = False

    def check(self, value: Any, name: str) -> None:
        if value is None and self.optional:
            return
        check_number(
            value,
            name,
            integer=self.integer,
            low=self.low,
            low_inclusive=self.low_inclusive,
            high=self.high,
        )


@dataclass(frozen=True)
class OneOf:
    """One of ``options`` (compared by type and value, so True is not 1), or an instance of one
    of ``types``."""

    options: tuple
    types: tuple[type, ...] = ()

    def check(self, value: Any, name: str) -> None:
        if self.types and isinstance(value, self.types):
            return
        if any(
            value is option or (type(value) is type(option) and value == option)
            for option in self.options
        ):
            return
        accepted = f"one of {self.options}"
        if self.types:
            accepted += " or an instance of " + " / ".join(t.__name__ for t in self.types)
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


@dataclass(frozen=True)
class Flag:
    """True or False."""

    def check(self, value: Any, name: str) -> None:
        check_bool(value, name)


@dataclass(frozen=True)
class Rule:
    """Any other constraint: ``check(value)`` raises an error that names the argument."""

    check_value: Callable[[Any], Any]

    def check(self, value: Any, name: str) -> None:
        self.check_value(value)


Constraint = Number | OneOf | Flag | Rule


def check_params(estimator: Any, constraints: Mapping[str, Constraint]) -> None:
    """Check every parameter of ``estimator`` named in ``constraints`` against its constraint.

    Raises
    ------
    TypeError, ValueError
        The first parameter that breaks its constraint, named in the message.
    """
    for name, constraint in constraints.items():
        constraint.check(getattr(estimator, name), name)


def check_bool(value, name: str) -> None:
    """Raise TypeError unless ``value`` is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_square_matrix(matrix, name: str, size: int) -> np.ndarray:
    """A finite (size, size) float array, or a clear ValueError naming ``name``."""
    array = check_array(as_numpy(matrix), dtype=np.float64, input_name=name)
    if array.shape != (size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}), got {array.shape}")
    return array


def check_metric_matrix(matrix, name: str, size: int) -> np.ndarray:
    """A finite, symmetric, positive semi-definite (size, size) array (a copy), or ValueError.

    Checked by :func:`check_symmetric_psd` in float64 (eigenvalues down to −√ε of the largest
    entry allowed).
    """
    array = np.array(check_square_matrix(matrix, name, size), dtype=np.float64)
    check_symmetric_psd(torch.from_numpy(array), name, torch.float64)
    return array


def check_symmetric_psd(M: torch.Tensor, name: str, dtype: torch.dtype | None) -> None:
    """Raise ValueError unless the finite matrix ``M`` is symmetric and PSD within rounding.

    Parameters
    ----------
    M : torch.Tensor, shape (d, d)
        Finite values; checked in float64.
    name : str
        The argument, for the messages.
    dtype : torch.dtype or None
        The precision ``M`` was computed in: asymmetry up to 1e-6 of the largest entry and
        eigenvalues down to −√ε(dtype) of it are rounding. None checks symmetry only.
    """
    M = M.double()
    scale = float(M.abs().max()) if M.numel() else 0.0
    if not torch.allclose(M, M.T, rtol=0.0, atol=1e-6 * scale):
        raise ValueError(f"{name} must be symmetric")
    if dtype is None or scale == 0:
        return
    # M + εI is positive definite for every PSD M (rounding included), not for M ⋡ 0
    symmetric = (M + M.T) / 2
    shift = math.sqrt(torch.finfo(dtype).eps) * scale
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    if int(torch.linalg.cholesky_ex(symmetric + shift * eye).info) != 0:
        lowest = float(torch.linalg.eigvalsh(symmetric)[0])
        raise ValueError(f"{name} must be positive semi-definite, but has eigenvalue {lowest:.3g}")


def seeded_generator(random_state: int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by ``random_state`` (None: a fresh random seed)."""
    generator = torch.Generator(device="cpu")
    if random_state is None:
        generator.seed()
    else:
        generator.manual_seed(int(random_state))
    return generator


def numpy_generator(random_state: object) -> np.random.Generator:
    """A ``numpy.random.Generator`` from an int seed, a generator or None (fresh), validated."""
    if isinstance(random_state, np.random.Generator) or random_state is None:
        return np.random.default_rng(random_state)
    if isinstance(random_state, (bool, np.bool_)) or not isinstance(
        random_state, (int, np.integer)
    ):
        raise TypeError(
            f"random_state must be an int, a numpy.random.Generator or None; got {random_state!r}"
        )
    if random_state < 0:
        raise ValueError(f"random_state must be a non-negative int; got {random_state}")
    return np.random.default_rng(int(random_state))


# -- inputs of the estimators ----------------------------------------------------------------


def _tensor_inputs(X: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype):
    """A tensor X (n, d) checked and moved to ``device`` in ``dtype`` (no host round trip)."""
    if X.is_complex() or X.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got a {X.dtype} tensor")
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(
            f"{name} must be a 2-D tensor (n_samples, n_features) with at least one sample and "
            f"one feature, got shape {tuple(X.shape)}"
        )
    converted = (X.detach() if X.requires_grad else X).to(device=device, dtype=dtype)
    if not bool(torch.isfinite(converted).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return converted


def estimator_inputs(
    estimator,
    X,
    y="no_validation",
    *,
    device: torch.device,
    dtype: torch.dtype,
    reset: bool,
    copy: bool = False,
    y_check: dict | None = None,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """Validated inputs of an estimator's ``fit`` (``reset=True``) or ``predict`` as a tensor.

    Arrays and array-likes are checked by scikit-learn's ``validate_data`` (which records
    ``n_features_in_`` and feature names); a ``torch.Tensor`` is checked and moved to
    ``device``/``dtype`` directly, without a round trip through numpy.

    Parameters
    ----------
    estimator : BaseEstimator
    X : array-like or torch.Tensor, shape (n_samples, n_features)
    y : array-like, optional
        Targets (``fit``), validated by ``validate_data`` with ``y_check`` (e.g.
        ``multi_output``); None is refused as scikit-learn refuses it. Not given: no targets.
    device, dtype
        Where the tensor goes.
    reset : bool
        True in ``fit``: record the number of features; False: check it.
    copy : bool
        Return a tensor of its own, never one sharing memory with ``X``.

    Returns
    -------
    X : torch.Tensor, shape (n_samples, n_features)
    y : ndarray or None
    """
    targets = not (isinstance(y, str) and y == "no_validation")
    y_check = y_check or {}
    if not isinstance(X, torch.Tensor):
        if not targets:
            X = validate_data(estimator, as_numpy(X), reset=reset, dtype=[np.float64, np.float32])
            return to_tensor(X, device, dtype, copy=copy), None
        X, y = validate_data(
            estimator, as_numpy(X), as_numpy(y), dtype=[np.float64, np.float32], **y_check
        )
        return to_tensor(X, device, dtype, copy=copy), y
    tensor = _tensor_inputs(X, "X", device, dtype)
    if copy and tensor.untyped_storage().data_ptr() == X.untyped_storage().data_ptr():
        tensor = tensor.clone()
    if targets:
        if y is None:
            raise ValueError(
                f"{type(estimator).__name__} requires y to be passed, but the target y is None"
            )
        y = validate_data(estimator, y=as_numpy(y), **y_check)
        check_consistent_length(tensor, y)
    else:
        y = None
    if reset:
        estimator.n_features_in_ = tensor.shape[1]
        if hasattr(estimator, "feature_names_in_"):
            del estimator.feature_names_in_
    elif tensor.shape[1] != estimator.n_features_in_:
        raise ValueError(
            f"X has {tensor.shape[1]} features, but {type(estimator).__name__} is expecting "
            f"{estimator.n_features_in_} features as input"
        )
    return tensor, y


def eval_set_inputs(
    eval_set, n_features: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, np.ndarray]:
    """An ``eval_set`` pair (X_val (m, n_features), y_val (m,) or (m, c)) validated.

    X_val may be an array-like or a tensor (moved to ``device``/``dtype`` directly); y_val is
    returned as a numpy array, with any dtype (labels or targets).
    """
    if not isinstance(eval_set, (tuple, list)) or len(eval_set) != 2:
        raise TypeError("eval_set must be a pair (X_val, y_val)")
    X_val, y_val = eval_set
    if isinstance(X_val, torch.Tensor):
        X_val = _tensor_inputs(X_val, "eval_set X", device, dtype)
    else:
        X_val = to_tensor(check_array(as_numpy(X_val), input_name="eval_set X"), device, dtype)
    y_val = check_array(as_numpy(y_val), ensure_2d=False, dtype=None, input_name="eval_set y")
    if X_val.shape[1] != n_features:
        raise ValueError(
            f"eval_set X has {X_val.shape[1]} features, but the model is fitted on {n_features}"
        )
    if len(X_val) != len(y_val):
        raise ValueError(f"eval_set X and y have different lengths: {len(X_val)} and {len(y_val)}")
    return X_val, y_val
