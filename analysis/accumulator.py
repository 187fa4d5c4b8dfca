"""Streaming collapse statistics: :class:`CollapseAccumulator`, fed batch by batch.

One pass accumulates counts, class sums and per-class squared norms (and, for small d, the
d × d second moment); for large d a second pass over the same data accumulates the K × K
statistics that ``nc1``, ``ncc_acc`` and ``nc4`` need once the class means are known. All in
float64 on the features' device (docs/design.md, *Collapse metrics*).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
import xarray as xr

from analysis._common import Array
from analysis.metrics import (
    CLASSIFIER_METRICS,
    METRICS,
    PER_SAMPLE_METRICS,
    check_global_mean,
    check_metrics,
    metric_dataset,
    warn_degenerate,
)

__all__ = ["Classifier", "CollapseAccumulator", "class_indices", "features_2d"]

Classifier: TypeAlias = Array | tuple[Array, Array] | torch.nn.Module


def features_2d(features: Any, device: torch.device | None) -> torch.Tensor:
    """Validate features of shape (b, ...); return a (b, d) float32/float64 tensor on ``device``.

    Float32/float64 inputs are returned as views where possible (the statistics promote them to
    float64 when they subtract a float64 reference point); other real dtypes become float64.
    The result must be treated as read-only: it may share memory with the input.
    """
    if isinstance(features, torch.Tensor):
        t = features.detach()
        if t.is_complex():
            raise TypeError(f"features: expected real values, got dtype {t.dtype}")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float64)
    else:
        a = np.asarray(features)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"features: expected a real numeric array, got dtype {a.dtype}")
        if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            a = a.astype(np.float64)
        elif not a.flags.writeable:
            a = a.copy()  # torch.from_numpy warns on read-only arrays
        t = torch.from_numpy(a)
    if t.ndim < 2:
        raise ValueError(
            f"features: expected shape (n_samples, n_features, ...), got shape {tuple(t.shape)}"
        )
    t = t.reshape(t.shape[0], int(np.prod(t.shape[1:]))).to(device=device)
    # One cheap reduction: the sum is finite unless an entry is NaN/inf (or the sum overflows,
    # which the exact check tells apart).
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError("features: contains NaN or infinite values")
    return t


def class_indices(labels: Any, n: int, num_classes: int, device: torch.device) -> torch.Tensor:
    """Validate integer class indices in [0, num_classes) of length ``n``; int64 on ``device``."""
    if isinstance(labels, torch.Tensor):
        y = labels.detach()
        if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"labels: expected integer class indices, got dtype {y.dtype}")
    else:
        a = np.asarray(labels)
        if a.dtype.kind not in "iu":
            raise TypeError(f"labels: expected integer class indices, got dtype {a.dtype}")
        y = torch.from_numpy(a.astype(np.int64))
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f"labels: expected shape ({n},) to match the features, got {tuple(y.shape)}"
        )
    y = y.to(device=device, dtype=torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels: expected class indices in [0, {num_classes}), got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    return y


def parse_classifier(classifier: Classifier, num_classes: int) -> tuple[torch.Tensor, Any]:
    """Classifier -> (weight (K, d), bias (K,) or None), float64 CPU tensors."""
    if isinstance(classifier, torch.nn.Module):
        weight, bias = getattr(classifier, "weight", None), getattr(classifier, "bias", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError("classifier: a module must have a `weight` tensor (e.g. nn.Linear)")
    elif isinstance(classifier, tuple | list):
        if len(classifier) != 2:
            raise ValueError(
                f"classifier: expected a weight or a (weight, bias) pair, got {len(classifier)} "
                "items"
            )
        weight, bias = classifier
    else:
        weight, bias = classifier, None

    def to64(x: Any, what: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.detach().to(device="cpu", dtype=torch.float64)
        else:
            a = np.asarray(x)
            if a.dtype.kind not in "biuf":
                raise TypeError(f"classifier: {what} must be real numeric, got dtype {a.dtype}")
            t = torch.from_numpy(np.array(a, dtype=np.float64))
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"classifier: {what} contains NaN or infinite values")
        return t

    w = to64(weight, "weight")
    if w.ndim != 2 or w.shape[0] != num_classes:
        raise ValueError(
            f"classifier: expected a weight of shape ({num_classes}, n_features), got "
            f"{tuple(w.shape)}"
        )
    b = None
    if bias is not None:
        b = to64(bias, "bias")
        if b.shape != (num_classes,):
            raise ValueError(
                f"classifier: expected a bias of shape ({num_classes},), got {tuple(b.shape)}"
            )
    return w, b


class CollapseAccumulator:
    """Streaming neural-collapse metrics, fed batch by batch.

    The first pass (:meth:`update`) accumulates, per class, the count, the sum of the features
    and the sum of their squared norms (all shifted by a per-class reference point for numerical
    stability), which determine ``nc1_trace``, ``tr_sw``, ``tr_sb``, ``cdnv``, the ``nc2``
    family and ``nc3``. ``ncc_acc`` and ``nc4`` compare every sample with the final class means,
    and ``nc1`` needs ``A = C̃ Σ_W C̃ᵀ`` (K × K), so they need a second pass
    (:meth:`update_second_pass`) over the same samples, in any order and batching. The one
    exception: when the only such metric requested is ``nc1`` and the feature dimension is at
    most ``max_dense_dim``, the d × d within-class scatter is accumulated in the first pass and
    no second pass is needed. :attr:`needs_second_pass` tells which case applies::

        acc = CollapseAccumulator(10)
        for x, y in loader:
            acc.update(features(x), y)
        if acc.needs_second_pass:
            for x, y in loader:
                acc.update_second_pass(features(x), y)
        ds = acc.result()

    Parameters
    ----------
    num_classes : int
        Number of classes ``K >= 2``; labels are class indices ``0 .. K-1``. Every class must
        receive at least one sample before :meth:`result`.
    classifier : array (K, d), (weight, bias) pair or torch.nn.Linear, optional
        Linear classifier of the features, for ``nc3`` and ``nc4``. ``nc4`` needs it during
        the second pass, so it must be given here; ``nc3`` may instead be obtained by passing
        it to :meth:`result`.
    global_mean : {"class", "sample"}, default "class"
        ``μ_G`` is the mean of the class means, or the sample-weighted mean of the features.
    metrics : sequence of str, optional
        Metrics to compute (subset of :data:`METRICS`). Default: all, with ``nc3``/``nc4`` only
        when a classifier is available.
    max_dense_dim : int, default 1024
        Largest feature dimension for which the d × d within-class scatter may be kept to get
        ``nc1`` in one pass (only used when no per-sample metric is requested).
    device : torch.device or str, optional
        Where the statistics live. Default: the device of the first batch of features (CPU for
        numpy input).

    Notes
    -----
    All statistics are float64. Class statistics are population statistics (divided by
    ``n_c``), so a class with a single sample has zero within-class variance and contributes
    nothing to ``Σ_W``. Memory is ``O(K·d + b·d)`` (``b`` the largest batch, one reused
    float64 workspace) plus ``d²`` in the dense case, whatever ``n``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        classifier: Classifier | None = None,
        global_mean: str = "class",
        metrics: Sequence[str] | None = None,
        max_dense_dim: int = 1024,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
            raise TypeError(f"num_classes: expected an int, got {type(num_classes).__name__}")
        if num_classes < 2:
            raise ValueError(f"num_classes: collapse metrics need at least 2, got {num_classes}")
        if isinstance(max_dense_dim, bool) or not isinstance(max_dense_dim, int | np.integer):
            raise TypeError(f"max_dense_dim: expected an int, got {type(max_dense_dim).__name__}")
        if max_dense_dim < 0:
            raise ValueError(f"max_dense_dim: expected >= 0, got {max_dense_dim}")
        self.num_classes = int(num_classes)
        self.global_mean = check_global_mean(global_mean)
        self.max_dense_dim = int(max_dense_dim)
        self._classifier = (
            None if classifier is None else parse_classifier(classifier, self.num_classes)
        )
        requested = check_metrics(metrics)
        if requested is not None and "nc4" in requested and self._classifier is None:
            raise ValueError(
                "metrics: 'nc4' needs the classifier during the pass over the data; pass "
                "classifier= to CollapseAccumulator"
            )
        self._requested = requested
        self._device = None if device is None else torch.device(device)
        self._dim: int | None = None
        self._dense = False
        self._second: dict[str, torch.Tensor] | None = None
        self._work: torch.Tensor | None = None

    # ------------------------------------------------------------------ state
    @property
    def num_features(self) -> int | None:
        """Feature dimension d (flattened), known after the first :meth:`update`."""
        return self._dim

    def _pass_metrics(self) -> tuple[str, ...]:
        """Metrics computed from the passes (``nc3`` may still come with ``result``)."""
        if self._requested is not None:
            return self._requested
        drop = set() if self._classifier is not None else set(CLASSIFIER_METRICS)
        return tuple(m for m in METRICS if m not in drop)

    @property
    def needs_second_pass(self) -> bool:
        """Whether :meth:`update_second_pass` must see the data before :meth:`result`."""
        metrics = self._pass_metrics()
        if PER_SAMPLE_METRICS.intersection(metrics):
            return True
        if "nc1" not in metrics:
            return False
        if self._dim is None:
            raise RuntimeError(
                "needs_second_pass: for nc1 this depends on the feature dimension; call "
                "update() with a first batch before asking"
            )
        return not self._dense

    def _initialise(self, dim: int, device: torch.device) -> None:
        self._dim, self._device = dim, device
        metrics = self._pass_metrics()
        self._dense = (
            "nc1" in metrics
            and not PER_SAMPLE_METRICS.intersection(metrics)
            and dim <= self.max_dense_dim
        )
        k, f64 = self.num_classes, {"dtype": torch.float64, "device": device}
        self._counts = torch.zeros(k, dtype=torch.int64, device=device)
        self._seen = torch.zeros(k, dtype=torch.bool, device=device)
        self._shift = torch.zeros(k, dim, **f64)
        self._sums = torch.zeros(k, dim, **f64)
        self._sq = torch.zeros(k, **f64)
        self._scatter = torch.zeros(dim, dim, **f64) if self._dense else None
        if self._classifier is not None:
            w, b = self._classifier
            if w.shape[1] != dim:
                raise ValueError(
                    f"classifier: weight has {w.shape[1]} columns but the features have "
                    f"{dim} (flattened) dimensions"
                )
            self._classifier = (w.to(device), None if b is None else b.to(device))

    def _batch(self, features: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        h = features_2d(features, self._device)
        if self._dim is None:
            self._initialise(h.shape[1], h.device)
        elif h.shape[1] != self._dim:
            raise ValueError(
                f"features: expected {self._dim} features per sample (flattened), got {h.shape[1]}"
            )
        return h, class_indices(labels, h.shape[0], self.num_classes, h.device)

    def _centre(self, h: torch.Tensor, y: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``h − points[y]`` in float64, written into a reused (b, d) workspace.

        Reusing one buffer instead of allocating fresh b × d tensors per batch avoids the page
        faults that otherwise dominate the run time on CPU.
        """
        rows = h.shape[0]
        if self._work is None or self._work.shape[0] < rows:
            self._work = torch.empty(rows, self._dim, dtype=torch.float64, device=self._device)
        out = torch.index_select(points, 0, y, out=self._work[:rows])
        return torch.sub(h, out, out=out)

    # ---------------------------------------------------------------- passes
    def update(self, features: Any, labels: Any) -> CollapseAccumulator:
        """Add a batch to the first pass.

        Parameters
        ----------
        features : array or tensor, shape (b, ...)
            Features of ``b`` samples, flattened to (b, d). Not modified.
        labels : integer array or tensor, shape (b,)
            Class indices in ``[0, num_classes)``.

        Returns
        -------
        CollapseAccumulator
            ``self``.
        """
        if self._second is not None:
            raise RuntimeError("update: the second pass has started; the first pass is closed")
        h, y = self._batch(features, labels)
        if h.shape[0] == 0:
            return self
        counts = torch.bincount(y, minlength=self.num_classes)
        new = (counts > 0) & ~self._seen
        if bool(new.any()):
            # Reference point of a class = its mean in the batch where it first appears.
            batch_sums = torch.zeros_like(self._sums).index_add_(0, y, h.to(torch.float64))
            self._shift[new] = batch_sums[new] / counts[new, None]
            self._seen |= new
        shifted = self._centre(h, y, self._shift)
        self._sums.index_add_(0, y, shifted)
        self._sq.index_add_(0, y, torch.linalg.vector_norm(shifted, dim=1).square())
        self._counts += counts
        if self._scatter is not None:
            self._scatter.addmm_(shifted.T, shifted)
        return self

    def _class_stats(self) -> dict[str, torch.Tensor]:
        if self._dim is None:
            raise RuntimeError("no features seen yet; call update() first")
        missing = torch.nonzero(self._counts == 0).flatten().tolist()
        if missing:
            raise ValueError(
                f"labels: class(es) {missing} received no samples; every one of the "
                f"{self.num_classes} classes needs at least one"
            )
        counts = self._counts.to(torch.float64)
        n = counts.sum()
        delta = self._sums / counts[:, None]  # μ_c − reference point
        means = self._shift + delta
        within = (self._sq - counts * torch.linalg.vecdot(delta, delta)).clamp_min(0.0)
        if self.global_mean == "class":
            mu_g = means.mean(0)
        else:
            mu_g = (counts @ means) / n
        centred = means - mu_g
        return {
            "counts": counts,
            "n": n,
            "means": means,
            "centred": centred,
            "gram": centred @ centred.T,
            "within": within,  # Σ_{i in c} ||h_i − μ_c||², shape (K,)
        }

    def update_second_pass(self, features: Any, labels: Any) -> CollapseAccumulator:
        """Add a batch to the second pass (same samples as the first pass, any order).

        The first call freezes the class means of the first pass. Accumulates only K × K
        statistics: ``C̃ Σ_W C̃ᵀ`` for ``nc1``, nearest-class-centre hits for ``ncc_acc`` and
        classifier disagreements for ``nc4``.

        Parameters
        ----------
        features : array or tensor, shape (b, ...)
        labels : integer array or tensor, shape (b,)

        Returns
        -------
        CollapseAccumulator
            ``self``.
        """
        if not self.needs_second_pass:
            raise RuntimeError(
                "update_second_pass: the requested metrics need no second pass "
                "(needs_second_pass is False)"
            )
        if self._second is None:
            stats = self._class_stats()
            k, dev = self.num_classes, self._device
            self._second = {
                "means": stats["means"],
                "centred": stats["centred"],
                "gram": stats["gram"],
                "counts": torch.zeros(k, dtype=torch.int64, device=dev),
                "a": torch.zeros(k, k, dtype=torch.float64, device=dev),
                "ncc_hits": torch.zeros((), dtype=torch.int64, device=dev),
                "disagree": torch.zeros((), dtype=torch.int64, device=dev),
                "project": stats["centred"],
            }
            if self._classifier is not None:
                w, b = self._classifier
                offset = stats["means"] @ w.T  # (K, K): row c = w·μ_c
                self._second["project"] = torch.cat([stats["centred"], w])
                self._second["offset"] = offset if b is None else offset + b
        s = self._second
        h, y = self._batch(features, labels)
        if h.shape[0] == 0:
            return self
        s["counts"] += torch.bincount(y, minlength=self.num_classes)
        # D = h − μ_y (float64, exact centring); P = D C̃ᵀ, and (h − μ_G) C̃ᵀ = P + G[y].
        dev = self._centre(h, y, s["means"])
        proj = (s["project"] @ dev.T).T  # (b, K) or (b, 2K) with the classifier rows
        p = proj[:, : self.num_classes]
        s["a"].addmm_(p.T, p)
        gram = s["gram"]
        # 2 (h − μ_G)·μ̃_c − ||μ̃_c||² = ||h − μ_G||² − ||h − μ_c||²: argmax = nearest centre.
        scores = 2.0 * (p + gram.index_select(0, y)) - torch.diagonal(gram)
        ncc_pred = scores.argmax(1)
        s["ncc_hits"] += (ncc_pred == y).sum()
        if self._classifier is not None:
            # w·h + b = w·(h − μ_y) + (w·μ_y + b)
            logits = proj[:, self.num_classes :] + s["offset"].index_select(0, y)
            s["disagree"] += (logits.argmax(1) != ncc_pred).sum()
        return self

    # ---------------------------------------------------------------- result
    def result(self, classifier: Classifier | None = None) -> xr.Dataset:
        """Collapse metrics of everything seen so far.

        Parameters
        ----------
        classifier : array (K, d), (weight, bias) pair or torch.nn.Linear, optional
            Classifier for ``nc3`` when none was given to the constructor (``nc4`` needs it
            at construction).

        Returns
        -------
        xarray.Dataset
            One scalar float64 variable per metric with attrs ``long_name``, ``definition`` and
            ``reference``; dataset attr ``config`` (JSON) records ``global_mean``,
            ``num_classes``, ``num_samples`` and ``num_features``.
        """
        if self._dim is None:
            raise RuntimeError("result: no features seen yet; call update() first")
        metrics = list(self._pass_metrics())
        clf = self._classifier
        if classifier is not None:
            if clf is not None:
                raise ValueError("classifier: already given to the constructor; give it only once")
            clf = parse_classifier(classifier, self.num_classes)
            if clf[0].shape[1] != self._dim:
                raise ValueError(
                    f"classifier: weight has {clf[0].shape[1]} columns but the features have "
                    f"{self._dim} (flattened) dimensions"
                )
            if self._requested is None:
                metrics.append("nc3")
        if "nc3" in metrics and clf is None:
            raise ValueError("metrics: 'nc3' needs a classifier; pass classifier=")
        if self.needs_second_pass and self._second is None:
            pending = [m for m in metrics if m == "nc1" or m in PER_SAMPLE_METRICS]
            raise RuntimeError(
                f"result: {pending} need a second pass over the same data; call "
                "update_second_pass(features, labels) for every batch first, or request only "
                "one-pass metrics with metrics="
            )
        st = self._class_stats()
        if self._second is not None and not torch.equal(self._second["counts"], self._counts):
            raise ValueError(
                "update_second_pass: the second pass saw class counts "
                f"{self._second['counts'].tolist()} but the first pass saw "
                f"{self._counts.tolist()}; both passes must see the same samples"
            )
        values = self._compute(st, metrics, clf)
        warn_degenerate(values)
        config = {
            "global_mean": self.global_mean,
            "num_classes": self.num_classes,
            "num_samples": int(self._counts.sum()),
            "num_features": self._dim,
        }
        return metric_dataset(values, config)

    def _compute(
        self,
        st: dict[str, torch.Tensor],
        metrics: Sequence[str],
        clf: tuple[torch.Tensor, Any] | None,
    ) -> dict[str, float]:
        """Metric values from the class statistics (and second-pass sums)."""
        k = self.num_classes
        n, gram, counts, within = st["n"], st["gram"], st["counts"], st["within"]
        out: dict[str, torch.Tensor] = {}
        tr_sw = within.sum() / n
        tr_sb = torch.trace(gram) / k
        iu = torch.triu_indices(k, k, offset=1, device=gram.device)
        norms = torch.diagonal(gram).sqrt()
        cos = gram / torch.outer(norms, norms)
        eye = torch.eye(k, dtype=torch.float64, device=gram.device)
        centring = eye - 1.0 / k
        if "nc1" in metrics:
            evals, evecs = torch.linalg.eigh(gram)
            keep = min(k - 1, self.num_features)
            evals, evecs = evals[-keep:], evecs[:, -keep:]
            top = evals[-1]
            if top > 0:
                ok = evals > top * max(k, self.num_features) * torch.finfo(torch.float64).eps
                a = self._within_projected(st)
                quad = torch.linalg.vecdot(evecs, a @ evecs, dim=0)  # v_iᵀ A v_i
                out["nc1"] = (quad[ok] / evals[ok] ** 2).sum()
            else:
                out["nc1"] = torch.tensor(float("nan"))
        if "nc1_trace" in metrics:
            out["nc1_trace"] = tr_sw / tr_sb
        if "tr_sw" in metrics:
            out["tr_sw"] = tr_sw
        if "tr_sb" in metrics:
            out["tr_sb"] = tr_sb
        if "cdnv" in metrics:
            var = within / counts
            diag = torch.diagonal(gram)
            dist2 = (diag[:, None] + diag[None, :] - 2.0 * gram)[iu[0], iu[1]]
            out["cdnv"] = ((var[iu[0]] + var[iu[1]]) / (2.0 * dist2)).mean()
        if "nc2" in metrics:
            etf = centring / (k - 1) ** 0.5
            out["nc2"] = torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - etf)
        if "nc2_equinorm" in metrics:
            out["nc2_equinorm"] = norms.std(correction=0) / norms.mean()
        if "nc2_equiangle" in metrics:
            out["nc2_equiangle"] = cos[iu[0], iu[1]].std(correction=0)
        if "nc2_dnc" in metrics:
            out["nc2_dnc"] = ((cos - centring * (k / (k - 1))) ** 2).mean()
        if "ncc_acc" in metrics:
            out["ncc_acc"] = self._second["ncc_hits"] / n
        if "nc3" in metrics:
            w = clf[0].to(gram.device)
            m_fro = torch.trace(gram).sqrt()
            out["nc3"] = ((w / torch.linalg.matrix_norm(w) - st["centred"] / m_fro) ** 2).sum()
        if "nc4" in metrics:
            out["nc4"] = self._second["disagree"] / n
        return {name: float(value) for name, value in out.items()}

    def _within_projected(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """``A = C̃ Σ_W C̃ᵀ`` (K × K) from the dense scatter or the second pass."""
        if self._second is not None:
            a = self._second["a"]
        else:
            # n Σ_W = S − Σ_c s_c s_cᵀ / n_c, S and s_c shifted by the class reference points.
            c = st["centred"]
            b = c @ self._sums.T
            a = c @ self._scatter @ c.T - (b / st["counts"]) @ b.T
        a = a / st["n"]
        return 0.5 * (a + a.T)
