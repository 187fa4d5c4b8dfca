"""Neural Feature Ansatz (NFA): correlation of a layer's NFM with a power of its AGOP.

For a layer with weight ``W`` (k × d) the Neural Feature Matrix is ``NFM = WᵀW`` and the Average
Gradient Outer Product ``AGOP`` is the mean outer product of the network's input gradients at
that layer (docs/design.md, *The probe's AGOP*). The ansatz states ``NFM ∝ AGOP^p`` (``p = 1``
or ``1/2``); it is measured by the Pearson correlation (or the cosine similarity) of the
flattened matrices.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from analysis._common import Array, named_items

__all__ = ["nfa_correlation", "nfa_correlations", "psd_power"]

_REFERENCE = (
    "Radhakrishnan, Beaglehole, Pandit & Belkin (2024), Mechanism for feature learning in "
    "neural networks and backpropagation-free machine learning models, Science 383:1461-1467, "
    "arXiv:2212.13881"
)
_METHODS = ("pearson", "cosine")


def _square(matrix: Any, name: str) -> torch.Tensor:
    """Validate a real, finite, square matrix; return it as a float64 tensor (read-only use)."""
    if isinstance(matrix, xr.DataArray):
        matrix = matrix.values
    if isinstance(matrix, torch.Tensor):
        if matrix.is_complex():
            raise TypeError(f"{name}: expected a real matrix, got dtype {matrix.dtype}")
        t = matrix.detach().to(torch.float64)
    else:
        a = np.asarray(matrix)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a real numeric matrix, got dtype {a.dtype}")
        t = torch.from_numpy(np.array(a, dtype=np.float64))
    if t.ndim != 2 or t.shape[0] != t.shape[1] or t.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty square matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def _check_power(power: Any, name: str = "power") -> float:
    if isinstance(power, bool) or not isinstance(power, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a positive number, got {type(power).__name__}")
    if not np.isfinite(power) or power <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {power}")
    return float(power)


def _eigen_power(evals: torch.Tensor, evecs: torch.Tensor, power: float) -> torch.Tensor:
    """``V diag(max(λ, 0)^power) Vᵀ`` from an eigendecomposition."""
    return (evecs * evals.clamp_min(0.0) ** power) @ evecs.T


def psd_power(matrix: Array, power: float) -> Array:
    """Power of a symmetric positive semi-definite matrix, computed in float64 via ``eigh``.

    The one PSD power of the library (``deeprfm.psd_power`` is this function).

    Parameters
    ----------
    matrix : array or tensor, shape (d, d)
        Symmetric PSD matrix; only its symmetric part ``(M + Mᵀ)/2`` is used. Not modified.
    power : float
        Positive exponent, e.g. ``0.5`` for the matrix square root.

    Returns
    -------
    array or tensor, shape (d, d)
        ``V diag(max(λ, 0)^power) Vᵀ``, a new matrix of the input's kind (numpy or torch),
        device and floating dtype (float64 for integer input). Negative eigenvalues (round-off
        of a PSD matrix) are clamped to 0, also for ``power == 1``; a diagonal matrix takes its
        elementwise power, without an ``eigh``.
    """
    p = _check_power(power)
    t = _square(matrix, "matrix")
    symmetric = 0.5 * (t + t.T)
    if not bool(torch.any(symmetric - torch.diag(torch.diagonal(symmetric)))):
        out = torch.diag(torch.diagonal(symmetric).clamp_min(0.0) ** p)
    else:
        out = _eigen_power(*torch.linalg.eigh(symmetric), p)
    if isinstance(matrix, torch.Tensor):
        return out.to(matrix.dtype if matrix.is_floating_point() else torch.float64)
    kind = np.asarray(matrix).dtype
    return out.numpy().astype(kind if kind.kind == "f" else np.float64)


def _correlate(x: torch.Tensor, y: torch.Tensor, method: str) -> float:
    """Pearson correlation or cosine similarity of two flattened matrices (NaN if undefined)."""
    a, b = x.reshape(-1), y.reshape(-1)
    if method == "pearson":
        a, b = a - a.mean(), b - b.mean()
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if den == 0.0:
        return float("nan")
    return min(1.0, max(-1.0, float(a @ b) / den))  # round-off can step just outside [-1, 1]


def _correlations(
    nfm: torch.Tensor, agop: torch.Tensor, powers: Sequence[float], methods: Sequence[str]
) -> np.ndarray:
    """Correlations of ``nfm`` with ``sym(agop)^p``, shape (len(methods), len(powers)).

    One ``eigh`` serves every fractional power, and one d × d power is held at a time;
    ``p = 1`` uses the symmetric part as is (no decomposition, no clamping).
    """
    sym = 0.5 * (agop + agop.T)
    eig = None
    out = np.empty((len(methods), len(powers)))
    for j, p in enumerate(powers):
        if p == 1.0:
            powered = sym
        else:
            eig = torch.linalg.eigh(sym) if eig is None else eig
            powered = _eigen_power(*eig, p)
        for i, method in enumerate(methods):
            out[i, j] = _correlate(nfm, powered, method)
    return out


def _check_method(method: Any, name: str = "method") -> str:
    if method not in _METHODS:
        raise ValueError(f"{name}: expected one of {_METHODS}, got {method!r}")
    return method


def nfa_correlation(nfm: Array, agop: Array, power: float = 0.5, method: str = "pearson") -> float:
    """Correlation between a Neural Feature Matrix and a power of the AGOP.

    Parameters
    ----------
    nfm : array or tensor, shape (d, d)
        Neural Feature Matrix ``WᵀW`` of a layer.
    agop : array or tensor, shape (d, d)
        AGOP of the same layer (symmetric PSD).
    power : float, default 0.5
        Exponent ``p`` of ``AGOP^p`` (via ``eigh``, negative eigenvalues clamped; ``p = 1``
        uses the symmetric part of ``agop`` as is).
    method : {"pearson", "cosine"}, default "pearson"
        Pearson correlation of the flattened matrices, or their cosine similarity
        ``⟨A, B⟩_F / (‖A‖_F ‖B‖_F)``.

    Returns
    -------
    float
        Correlation in ``[-1, 1]``; NaN when a matrix is constant (Pearson) or zero (cosine).
    """
    x, m = _square(nfm, "nfm"), _square(agop, "agop")
    if x.shape != m.shape:
        raise ValueError(f"agop: expected the shape of nfm {tuple(x.shape)}, got {tuple(m.shape)}")
    p = _check_power(power)
    method = _check_method(method)
    return float(_correlations(x, m.to(x.device), [p], [method])[0, 0])


def nfa_correlations(
    nfms: Mapping[Hashable, Array] | Sequence[Array],
    agops: Mapping[Hashable, Array] | Sequence[Array],
    *,
    powers: Sequence[float] = (1.0, 0.5),
    methods: Sequence[str] = ("pearson", "cosine"),
) -> xr.Dataset:
    """NFA correlations of several layers, as a Dataset over ``layer`` and ``power``.

    Parameters
    ----------
    nfms : mapping name -> (d_l, d_l) matrix, or sequence of matrices
        NFM of each layer (sizes may differ between layers). A mapping's order and keys give
        the ``layer`` coordinate; a sequence gives ``0 .. L-1``.
    agops : mapping or sequence, like ``nfms``
        AGOP of the same layers (same keys, or same length).
    powers : sequence of float, default (1.0, 0.5)
        Exponents ``p`` of ``AGOP^p``; one ``eigh`` per layer serves all of them.
    methods : sequence of {"pearson", "cosine"}, default both

    Returns
    -------
    xarray.Dataset
        Variables ``nfa_pearson`` and/or ``nfa_cosine`` of dims ``(layer, power)`` with attrs
        ``long_name``, ``definition``, ``reference``; attr ``config`` (JSON) records
        ``num_features`` per layer.
    """
    names, nfm_list = named_items(nfms, "nfms")
    agop_names, agop_list = named_items(agops, "agops")
    if isinstance(nfms, Mapping) != isinstance(agops, Mapping) or set(names) != set(agop_names):
        raise ValueError(f"agops: expected the same layers as nfms {names}, got {agop_names}")
    if isinstance(agops, Mapping):
        agop_list = [agops[name] for name in names]
    if isinstance(powers, int | float):
        powers = [powers]
    p_list = [_check_power(p, "powers") for p in powers]
    if not p_list:
        raise ValueError("powers: expected at least one exponent")
    if isinstance(methods, str):
        methods = [methods]
    m_list = [_check_method(m, "methods") for m in dict.fromkeys(methods)]
    if not m_list:
        raise ValueError("methods: expected at least one of ('pearson', 'cosine')")

    values = np.empty((len(m_list), len(names), len(p_list)))
    dims = []
    for j, (name, nfm, agop) in enumerate(zip(names, nfm_list, agop_list, strict=True)):
        x, m = _square(nfm, f"nfms[{name!r}]"), _square(agop, f"agops[{name!r}]")
        if x.shape != m.shape:
            raise ValueError(
                f"agops[{name!r}]: expected the shape of the NFM {tuple(x.shape)}, got "
                f"{tuple(m.shape)}"
            )
        values[:, j] = _correlations(x, m.to(x.device), p_list, m_list)
        dims.append(x.shape[0])

    long = {"pearson": "Pearson correlation", "cosine": "cosine similarity"}
    data = {
        f"nfa_{method}": (
            ("layer", "power"),
            values[i],
            {
                "long_name": f"NFA {long[method]} of NFM and AGOP^power",
                "definition": (
                    "Pearson correlation of the flattened matrices NFM = W^T W and AGOP^p"
                    if method == "pearson"
                    else "<NFM, AGOP^p>_F / (||NFM||_F ||AGOP^p||_F)"
                )
                + "; AGOP^p via eigh with negative eigenvalues clamped to 0",
                "reference": _REFERENCE,
            },
        )
        for i, method in enumerate(m_list)
    }
    config = {"num_features": dims}
    return xr.Dataset(
        data,
        coords={"layer": names, "power": np.array(p_list)},
        attrs={"config": json.dumps(config)},
    )
