"""Checks of user input shared by the estimators; every error names the argument."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.utils.validation import check_array


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
) -> None:
    """Raise TypeError/ValueError unless ``value`` is a (integer) number ≥ / > ``low``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (not low_inclusive and value == low)):
        relation = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {relation} {low}, got {value!r}")


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
