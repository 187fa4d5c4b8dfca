"""Neural-collapse metrics (NC1–NC4) of features, one-shot and over layers, as xarray datasets.

The metrics are defined in :mod:`analysis.metrics` and accumulated by
:class:`analysis.accumulator.CollapseAccumulator`; this module runs them on arrays that fit in
memory (:func:`collapse_metrics`), over the layers of a model (:func:`collapse_curves`) and
stacks results (:func:`stack_curves`).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr

from analysis._common import Array, named_items
from analysis.accumulator import Classifier, CollapseAccumulator
from analysis.metrics import CHUNK_ELEMENTS, CLASSIFIER_METRICS, METRICS, check_metrics

__all__ = [
    "METRICS",
    "CollapseAccumulator",
    "collapse_curves",
    "collapse_metrics",
    "stack_curves",
]


def _encode_labels(labels: Any, n: int) -> tuple[np.ndarray, int]:
    """Any labels (n,) -> class indices into the sorted unique labels, and the class count."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    a = np.asarray(labels)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(
            f"labels: expected shape ({n},) to match the features, got {tuple(a.shape)}"
        )
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        raise ValueError("labels: contains NaN or infinite values")
    try:
        classes, index = np.unique(a, return_inverse=True)
    except TypeError as err:
        raise TypeError(f"labels: values must be mutually comparable ({err})") from err
    if len(classes) < 2:
        raise ValueError(
            f"labels: collapse metrics need at least 2 classes, got {len(classes)} "
            f"({classes.tolist()})"
        )
    return index.reshape(-1), len(classes)


def _as_samples(features: Any) -> Array:
    """Index-able (n, ...) array without copying torch tensors or numpy arrays."""
    f = features if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim < 2:
        raise ValueError(
            f"features: expected shape (n_samples, n_features, ...), got shape {tuple(f.shape)}"
        )
    return f


def _run_passes(acc: CollapseAccumulator, features: Array, index: np.ndarray) -> xr.Dataset:
    n = features.shape[0]
    dim = max(1, int(np.prod(features.shape[1:])))
    step = max(1, CHUNK_ELEMENTS // dim)
    for start in range(0, n, step):
        acc.update(features[start : start + step], index[start : start + step])
    if acc.needs_second_pass:
        for start in range(0, n, step):
            acc.update_second_pass(features[start : start + step], index[start : start + step])
    return acc.result()


def collapse_metrics(
    features: Any,
    labels: Any,
    *,
    classifier: Classifier | None = None,
    global_mean: str = "class",
    metrics: Sequence[str] | None = None,
) -> xr.Dataset:
    """Neural-collapse metrics of one set of features.

    Parameters
    ----------
    features : array or tensor, shape (n, ...)
        One row per sample; trailing dims (e.g. conv feature maps ``(C, H, W)``) are flattened
        to ``d``. Computation runs in float64 on the tensor's device, in row chunks of bounded
        size. Not modified.
    labels : array-like or tensor, shape (n,)
        Any labels (ints, strings, ...); class ``c`` is the ``c``-th sorted unique label.
        At least two classes.
    classifier : array (K, d), (weight, bias) pair or torch.nn.Linear, optional
        Linear classifier ``argmax_c (w_c · h + b_c)`` with rows in sorted-label order; adds
        ``nc3`` and ``nc4``.
    global_mean : {"class", "sample"}, default "class"
        ``μ_G`` = mean of the class means, or sample mean of the features.
    metrics : sequence of str, optional
        Subset of :data:`METRICS` to compute; default all (``nc3``/``nc4`` with a classifier).

    Returns
    -------
    xarray.Dataset
        Scalar float64 variables ``nc1``, ``nc1_trace``, ``tr_sw``, ``tr_sb``, ``cdnv``,
        ``nc2``, ``nc2_equinorm``, ``nc2_equiangle``, ``nc2_dnc``, ``ncc_acc`` (and ``nc3``,
        ``nc4``), each with attrs ``long_name``, ``definition``, ``reference``; attr ``config``
        (JSON string).

    Notes
    -----
    Population statistics are used throughout, so a class with one sample is allowed and has
    zero within-class variance. ``nc1`` is NaN when all class means coincide; ratios with a zero
    denominator follow IEEE arithmetic (``inf``/NaN).
    """
    feats = _as_samples(features)
    index, k = _encode_labels(labels, feats.shape[0])
    acc = CollapseAccumulator(
        k, classifier=classifier, global_mean=global_mean, metrics=metrics, max_dense_dim=0
    )
    return _run_passes(acc, feats, index)


def collapse_curves(
    features_by_layer: Mapping[Hashable, Any] | Sequence[Any],
    labels: Any,
    *,
    classifiers: Mapping[Hashable, Classifier] | None = None,
    global_mean: str = "class",
    metrics: Sequence[str] | None = None,
) -> xr.Dataset:
    """Collapse metrics of every layer's features, along a ``layer`` dimension.

    Parameters
    ----------
    features_by_layer : mapping name -> array (n, ...), or sequence of arrays
        Features of each layer for the same ``n`` samples (each layer its own ``d``). A mapping
        keeps its order and its keys become the ``layer`` coordinate; a sequence gives layers
        ``0 .. L-1``.
    labels : array-like or tensor, shape (n,)
        Labels of the samples, as in :func:`collapse_metrics`.
    classifiers : mapping name -> classifier, optional
        Classifiers of some layers; ``nc3``/``nc4`` are computed there and NaN elsewhere.
    global_mean, metrics
        As in :func:`collapse_metrics`.

    Returns
    -------
    xarray.Dataset
        Variables of dims ``(layer,)``; attr ``config`` (JSON) records ``global_mean``,
        ``num_classes``, ``num_samples`` and ``num_features`` per layer.
    """
    names, layers = named_items(features_by_layer, "features_by_layer")
    classifiers = dict(classifiers or {})
    unknown = [name for name in classifiers if name not in names]
    if unknown:
        raise ValueError(f"classifiers: layer(s) {unknown} not in features_by_layer {names}")
    requested = check_metrics(metrics)
    if requested is not None and CLASSIFIER_METRICS.intersection(requested) and not classifiers:
        raise ValueError("metrics: 'nc3'/'nc4' need classifiers=")
    feats = [_as_samples(f) for f in layers]
    index, k = _encode_labels(labels, feats[0].shape[0])
    results = []
    for name, f in zip(names, feats, strict=True):
        if f.shape[0] != len(index):
            raise ValueError(
                f"features_by_layer: layer {name!r} has {f.shape[0]} samples, expected {len(index)}"
            )
        clf = classifiers.get(name)
        layer_metrics = requested
        if clf is None and requested is not None:
            layer_metrics = tuple(m for m in requested if m not in CLASSIFIER_METRICS)
        acc = CollapseAccumulator(
            k, classifier=clf, global_mean=global_mean, metrics=layer_metrics, max_dense_dim=0
        )
        results.append(_run_passes(acc, f, index))
    present = [m for m in METRICS if any(m in ds for ds in results)]
    data = {
        m: (
            "layer",
            np.array([float(ds[m]) if m in ds else np.nan for ds in results]),
            next(ds[m].attrs for ds in results if m in ds),
        )
        for m in present
    }
    config = {
        "global_mean": global_mean,
        "num_classes": k,
        "num_samples": len(index),
        "num_features": [int(np.prod(f.shape[1:])) for f in feats],
    }
    return xr.Dataset(
        data, coords={"layer": names}, attrs={"config": json.dumps(config, sort_keys=True)}
    )


def stack_curves(
    datasets: Mapping[Hashable, xr.Dataset] | Sequence[xr.Dataset], dim: str = "epoch"
) -> xr.Dataset:
    """Stack collapse datasets (e.g. one per epoch or seed) along a new dimension.

    Parameters
    ----------
    datasets : mapping coordinate -> Dataset, or sequence of Datasets
        Results of :func:`collapse_curves` (or :func:`collapse_metrics`) with identical
        ``layer`` coordinates. Mapping keys become the coordinate of ``dim``; a sequence gives
        ``0 .. N-1``.
    dim : str, default "epoch"
        Name of the new dimension, e.g. ``"epoch"`` or ``"seed"``.

    Returns
    -------
    xarray.Dataset
        Variables of dims ``(dim, *old_dims)``; a variable missing from some inputs is NaN
        there. Attributes that differ between inputs are dropped.
    """
    keys, dsets = named_items(datasets, "datasets")
    if not isinstance(dim, str) or not dim:
        raise TypeError(f"dim: expected a non-empty str, got {dim!r}")
    for key, ds in zip(keys, dsets, strict=True):
        if not isinstance(ds, xr.Dataset):
            raise TypeError(f"datasets: entry {key!r} is a {type(ds).__name__}, not a Dataset")
        if dim in ds.dims or dim in ds.variables:
            raise ValueError(f"dim: {dim!r} already exists in dataset {key!r}")
    try:
        stacked = xr.concat(dsets, dim=dim, join="exact", combine_attrs="drop_conflicts")
    except ValueError as err:
        raise ValueError(
            f"datasets: cannot stack along {dim!r}; they must share their coordinates "
            f"(e.g. identical layer names in the same order): {err}"
        ) from err
    return stacked.assign_coords({dim: keys})
