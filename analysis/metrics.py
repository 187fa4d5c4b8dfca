"""The neural-collapse metrics: their names, definitions, references and result datasets.

Notation (docs/design.md, *Collapse metrics*): features ``H`` (n × d, one row per sample, conv
feature maps flattened), ``K`` classes with counts ``n_c`` and means ``μ_c``, global mean
``μ_G`` (the mean of the class means, or the sample mean with ``global_mean="sample"``),
centred means ``μ̃_c = μ_c − μ_G`` stacked as the rows of ``C̃`` (K × d), their Gram matrix
``G = C̃ C̃ᵀ`` (K × K), ``Σ_W = (1/n) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ`` and ``Σ_B = (1/K) C̃ᵀ C̃``.

No d × d matrix is ever needed: ``nc1 = (1/K) tr(Σ_W Σ_B^†) = tr(G^{†2} A)`` with the K × K
matrix ``A = C̃ Σ_W C̃ᵀ``, which a second pass over the data accumulates once the class means are
known. All statistics are accumulated in float64 on the features' device.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from analysis._common import user_stacklevel

__all__ = ["METRICS", "METRIC_INFO", "check_global_mean", "check_metrics", "metric_dataset"]

_PAPYAN = (
    "Papyan, Han & Donoho (2020), Prevalence of neural collapse during the terminal phase of "
    "deep learning training, PNAS 117(40):24652-24663, arXiv:2008.08186"
)
_DNC = (
    "Beaglehole, Súkeník, Mondelli & Belkin (2024), Average gradient outer product as a "
    "mechanism for deep neural collapse, NeurIPS 2024, arXiv:2402.13728"
)
_GALANTI = (
    "Galanti, György & Hutter (2022), On the role of neural collapse in transfer learning, "
    "ICLR 2022, arXiv:2112.15121"
)
_ZHU = (
    "Zhu, Ding, Zhou, Li, You, Sulam & Qu (2021), A geometric analysis of neural collapse with "
    "unconstrained features, NeurIPS 2021, arXiv:2105.02375"
)

# Every metric, in dataset order: name -> (long_name, definition, reference).
METRIC_INFO: dict[str, tuple[str, str, str]] = {
    "nc1": (
        "NC1 (within-class variability relative to between-class scatter)",
        "(1/K) tr(Sigma_W Sigma_B^+), Sigma_B^+ the pseudo-inverse of Sigma_B restricted to its "
        "top min(K-1, d) eigen-directions; computed as tr(G^{+2} C Sigma_W C^T) with the K x K "
        "Gram matrix G = C C^T of the centred class means C",
        _PAPYAN,
    ),
    "nc1_trace": (
        "NC1, trace ratio",
        "tr(Sigma_W) / tr(Sigma_B)",
        _DNC,
    ),
    "tr_sw": (
        "trace of the within-class covariance",
        "tr(Sigma_W), Sigma_W = (1/n) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T",
        _PAPYAN,
    ),
    "tr_sb": (
        "trace of the between-class covariance",
        "tr(Sigma_B), Sigma_B = (1/K) sum_c (mu_c - mu_G)(mu_c - mu_G)^T",
        _PAPYAN,
    ),
    "cdnv": (
        "class-distance normalised variance",
        "mean over class pairs c < c' of (sigma_c^2 + sigma_c'^2) / (2 ||mu_c - mu_c'||^2), "
        "sigma_c^2 = mean over class c of ||h - mu_c||^2",
        _GALANTI,
    ),
    "nc2": (
        "NC2 (distance of the centred class means to a simplex ETF)",
        "|| G/||G||_F - (I - 11^T/K)/sqrt(K-1) ||_F, G = C C^T the Gram matrix of the centred "
        "class means",
        _ZHU,
    ),
    "nc2_equinorm": (
        "NC2 equinorm (coefficient of variation of the centred class-mean norms)",
        "std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G|| (population std)",
        _PAPYAN,
    ),
    "nc2_equiangle": (
        "NC2 equiangularity (spread of the cosines between centred class means)",
        "std over pairs c < c' of cos(mu_c - mu_G, mu_c' - mu_G) (population std)",
        _PAPYAN,
    ),
    "nc2_dnc": (
        "NC2, DNC variant",
        "mean of the squared entries of U U^T - (K/(K-1))(I - 11^T/K), U the row-normalised "
        "centred class means",
        _DNC,
    ),
    "ncc_acc": (
        "nearest-class-centre accuracy",
        "fraction of samples i with argmin_c ||h_i - mu_c|| = y_i",
        _PAPYAN,
    ),
    "nc3": (
        "NC3 (self-duality of classifier and centred class means)",
        "|| W/||W||_F - C/||C||_F ||_F^2, W the K x d classifier weight, C the centred class means",
        _PAPYAN,
    ),
    "nc4": (
        "NC4 (disagreement of the classifier with the nearest class centre)",
        "fraction of samples i with argmax_c (w_c . h_i + b_c) != argmin_c ||h_i - mu_c||",
        _PAPYAN,
    ),
}

#: Names of all collapse metrics, in dataset order.
METRICS: tuple[str, ...] = tuple(METRIC_INFO)
CLASSIFIER_METRICS = frozenset({"nc3", "nc4"})
# Metrics that look at every sample against the final class means: always a second pass.
PER_SAMPLE_METRICS = frozenset({"ncc_acc", "nc4"})
# Rows per chunk in the one-shot function: at most this many elements (32 MiB in float64).
CHUNK_ELEMENTS = 2**22


def check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...] | None:
    if metrics is None:
        return None
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(metrics)
    unknown = [m for m in names if m not in METRIC_INFO]
    if unknown:
        raise ValueError(f"metrics: unknown metric(s) {unknown}; expected a subset of {METRICS}")
    if not names:
        raise ValueError("metrics: expected at least one metric name, got an empty list")
    return tuple(m for m in METRICS if m in names)


def check_global_mean(global_mean: str) -> str:
    if global_mean not in ("class", "sample"):
        raise ValueError(f"global_mean: expected 'class' or 'sample', got {global_mean!r}")
    return global_mean


def metric_dataset(values: Mapping[str, float], config: Mapping[str, Any]) -> xr.Dataset:
    data = {
        name: xr.DataArray(
            float(values[name]),
            attrs={"long_name": info[0], "definition": info[1], "reference": info[2]},
        )
        for name, info in METRIC_INFO.items()
        if name in values
    }
    return xr.Dataset(data, attrs={"config": json.dumps(dict(config), sort_keys=True)})


def warn_degenerate(values: Mapping[str, float]) -> None:
    """Warn once, naming them, when metrics are NaN or infinite, and say why."""
    bad = [name for name, value in values.items() if not np.isfinite(value)]
    if not bad:
        return
    if values.get("tr_sb", 1.0) == 0.0 or values.get("nc1_trace") != values.get("nc1_trace"):
        why = "all class means coincide (Sigma_B = 0), as for constant or zero features"
    else:
        why = "some class means coincide or equal the global mean (a zero distance or norm)"
    warnings.warn(
        f"collapse metrics {bad} are not finite: {why}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
