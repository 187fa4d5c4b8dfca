"""Collapse curves and matrix pictures with matplotlib (imported lazily, ``plot`` extra).

Both functions draw on a given Axes or a new figure's Axes, return the Axes and never call
``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from analysis._common import pyplot

__all__ = ["plot_collapse", "plot_matrix"]

_MAX_LEGEND_LINES = 12
_LINESTYLES = ("-", "--", ":", "-.")


def plot_collapse(ds: xr.Dataset, metrics: Sequence[str] = ("nc1", "nc2"), ax: Any = None) -> Any:
    """Collapse curves: metrics against ``layer`` on a log-scale y axis.

    Parameters
    ----------
    ds : xarray.Dataset
        Output of :func:`analysis.collapse_curves`, possibly stacked along further dims (e.g.
        ``epoch``, ``seed`` via :func:`analysis.stack_curves`). Every requested variable must
        have the dim ``layer``.
    metrics : sequence of str, default ("nc1", "nc2")
        Variables to draw, each with its own line style.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        One line per metric and per combination of the other dims (coloured along them).
        Non-positive values are not drawn (log scale).
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"ds: expected an xarray.Dataset, got {type(ds).__name__}")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("metrics: expected at least one variable name")
    missing = [m for m in metrics if m not in ds.data_vars]
    if missing:
        raise ValueError(f"metrics: {missing} not in ds; available: {list(ds.data_vars)}")
    no_layer = [m for m in metrics if "layer" not in ds[m].dims]
    if no_layer:
        raise ValueError(f"ds: variable(s) {no_layer} have no 'layer' dimension")
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4), layout="constrained")

    layers = ds["layer"].values
    x = np.arange(len(layers))
    run_dims = [d for d in ds[metrics[0]].dims if d != "layer"]
    for m in metrics:
        if [d for d in ds[m].dims if d != "layer"] != run_dims:
            raise ValueError(f"ds: variable {m!r} has dims {ds[m].dims}, unlike {metrics[0]!r}")
    runs = (
        ds[metrics].stack(run=run_dims).transpose("run", "layer")
        if run_dims
        else ds[metrics].expand_dims("run").transpose("run", "layer")
    )
    n_runs = runs.sizes["run"]
    from matplotlib.colors import ListedColormap, Normalize

    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0.0, 0.9, 256)))
    numeric = len(run_dims) == 1 and np.issubdtype(ds[run_dims[0]].dtype, np.number)
    if numeric:
        coord = ds[run_dims[0]].values.astype(np.float64)
        norm = Normalize(vmin=coord.min(), vmax=coord.max())
        shade = runs[run_dims[0]].values.astype(np.float64)
        shade = norm(shade) if coord.max() > coord.min() else np.zeros(n_runs)
    else:
        shade = np.linspace(0.0, 1.0, n_runs)
    legend = len(metrics) * n_runs <= _MAX_LEGEND_LINES
    for i, m in enumerate(metrics):
        style = _LINESTYLES[i % len(_LINESTYLES)]
        values = runs[m].values
        for r in range(n_runs):
            label = m
            if run_dims and legend:
                coord_r = runs["run"].values[r]
                coord_r = coord_r if isinstance(coord_r, tuple) else (coord_r,)
                parts = ", ".join(f"{d}={c}" for d, c in zip(run_dims, coord_r, strict=True))
                label = f"{m} ({parts})"
            ax.plot(
                x,
                values[r],
                linestyle=style,
                marker="o",
                markersize=3,
                color=f"C{i}" if n_runs == 1 else cmap(float(shade[r])),
                label=label if legend or r == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_xticks(x)
    rotate = 45 if any(isinstance(v, str) and len(v) > 3 for v in layers) else 0
    ax.set_xticklabels(
        [str(v) for v in layers], rotation=rotate, ha="right" if rotate else "center"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel(", ".join(metrics))
    ax.legend(fontsize="small")
    if not legend and numeric:
        mappable = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
        ax.figure.colorbar(mappable, ax=ax, label=run_dims[0])
    return ax


def plot_matrix(
    matrix: Any,
    ax: Any = None,
    *,
    title: str | None = None,
    cmap: str = "RdBu_r",
    colorbar: bool = True,
) -> Any:
    """Picture of a matrix (e.g. an NFM or AGOP), colours centred at zero.

    Parameters
    ----------
    matrix : array, tensor or DataArray, shape (m, n)
        The matrix to draw. Not modified.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure.
    title : str, optional
        Axes title.
    cmap : str, default "RdBu_r"
        Diverging colormap; limits are ``±max|M|``.
    colorbar : bool, default True
        Whether to add a colorbar.

    Returns
    -------
    matplotlib.axes.Axes
    """
    if isinstance(matrix, torch.Tensor):
        m = matrix.detach().cpu().numpy()
    else:
        m = np.asarray(matrix.values if isinstance(matrix, xr.DataArray) else matrix)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"matrix: expected a non-empty 2-D array, got shape {m.shape}")
    if m.dtype.kind not in "biuf":
        raise TypeError(f"matrix: expected real numbers, got dtype {m.dtype}")
    m = m.astype(np.float64)
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    finite = m[np.isfinite(m)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    image = ax.imshow(m, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
    if colorbar:
        ax.figure.colorbar(image, ax=ax)
    if title is not None:
        ax.set_title(title)
    return ax
