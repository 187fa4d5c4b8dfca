"""Feature selection by the diagonal of an RFM's metric: RFM-T, the paper's "lottery tickets".

Radhakrishnan et al. (Science 2024) retrain a kernel machine on the coordinates whose diagonal
of the learned feature matrix M, min-max scaled,

    s_i = (M_ii − min_j M_jj) / (max_j M_jj − min_j M_jj),

exceeds 0.05. `AGOPFeatureSelector` is that rule as a scikit-learn selector: it fits an RFM (or
takes M), scores the coordinates by s, and keeps those above a threshold or the top k, so
RFM-T is ``make_pipeline(AGOPFeatureSelector(), RFMClassifier(iters=0))``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.feature_selection import SelectorMixin
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from analysis._common import pyplot
from deeprfm._validation import Number, as_numpy, check_params, check_square_matrix
from deeprfm.rfm import RFMClassifier, RFMRegressor

__all__ = ["PAPER_THRESHOLD", "AGOPFeatureSelector", "scaled_diagonal"]

#: The RFM paper's threshold on the min-max-scaled diagonal of M.
PAPER_THRESHOLD = 0.05

_CLASSIFICATION_TARGETS = ("binary", "multiclass")


def scaled_diagonal(M: Any) -> np.ndarray:
    """The diagonal of a square matrix, min-max scaled to [0, 1].

    Parameters
    ----------
    M : array-like, shape (d, d)

    Returns
    -------
    numpy.ndarray of float64, shape (d,)
        (M_ii − min_j M_jj) / (max_j M_jj − min_j M_jj); all ones when the diagonal is constant
        (no coordinate is preferred, so none is ranked below another).
    """
    diagonal = np.diag(np.asarray(M, dtype=np.float64)).copy()
    low, high = diagonal.min(), diagonal.max()
    if not high > low:
        return np.ones_like(diagonal)
    return (diagonal - low) / (high - low)


class AGOPFeatureSelector(SelectorMixin, BaseEstimator):
    """Keep the coordinates an RFM's metric M weighs most (RFM-T of the RFM paper).

    Scores every input coordinate by the min-max-scaled diagonal of M (`scaled_diagonal`) and
    keeps those scoring above ``threshold`` (default the paper's 0.05) or the ``k`` best.

    Parameters
    ----------
    estimator : estimator, optional
        Fitted on (X, y) to learn M; it must expose ``M_`` (n_features, n_features) after
        ``fit``. It is cloned, never modified. Default: ``RFMClassifier()`` when y is a class
        label vector (binary or multiclass, in the sense of
        ``sklearn.utils.multiclass.type_of_target``), else ``RFMRegressor()``.
    M : array-like, shape (n_features, n_features), optional
        A metric to score by instead of fitting an estimator (then ``y`` is not needed and
        ``estimator`` must be None), e.g. an RFM's ``M_``; only its diagonal is used.
    threshold : float in [0, 1), optional
        Keep the coordinates whose score exceeds it. Default: 0.05 (`PAPER_THRESHOLD`) unless
        ``k`` is given. The best coordinate scores 1, so at least one is always kept.
    k : int, optional
        Keep the ``k`` best coordinates instead (ties broken by position). ``threshold`` and
        ``k`` are mutually exclusive: giving both raises ValueError.

    Attributes
    ----------
    scores_ : ndarray of float64, shape (n_features,)
        The min-max-scaled diagonal of M.
    support_ : ndarray of bool, shape (n_features,)
        The kept coordinates (also ``get_support()``).
    metric_ : ndarray of float64, shape (n_features, n_features)
        The metric M that was scored.
    estimator_ : estimator
        The fitted clone of ``estimator`` (absent when ``M`` is given).
    n_features_in_ : int

    Examples
    --------
    RFM-T: an RFM chooses the pixels, a kernel machine is fitted on them.

    >>> from sklearn.pipeline import make_pipeline
    >>> from deeprfm import RFMClassifier
    >>> from deeprfm.data import load_dataset
    >>> X, y = load_dataset("digits", n=300, random_state=0)
    >>> rfm_t = make_pipeline(AGOPFeatureSelector(), RFMClassifier(iters=0)).fit(X, y)
    >>> int(rfm_t[0].get_support().sum()) < X.shape[1]
    True
    """

    _constraints: ClassVar[dict[str, Number]] = {
        "threshold": Number(low=0, optional=True),
        "k": Number(integer=True, low=1, optional=True),
    }

    def __init__(
        self,
        estimator: BaseEstimator | None = None,
        M: Any = None,
        threshold: float | None = None,
        k: int | None = None,
    ) -> None:
        self.estimator = estimator
        self.M = M
        self.threshold = threshold
        self.k = k

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = self.M is None
        return tags

    def _check_selection(self, n_features: int) -> None:
        if self.threshold is not None and self.k is not None:
            raise ValueError(
                f"threshold and k are mutually exclusive; got threshold={self.threshold!r} and "
                f"k={self.k!r} (set one of them to None)"
            )
        check_params(self, self._constraints)
        if self.k is not None and self.k > n_features:
            raise ValueError(f"k={self.k} exceeds the {n_features} features of X")
        if self.threshold is not None:
            if not self.threshold < 1:
                raise ValueError(
                    f"threshold must be in [0, 1) (scores lie in [0, 1], the best is 1), "
                    f"got {self.threshold!r}"
                )

    def fit(self, X, y=None):
        """Learn (or take) M and choose the coordinates.

        Parameters
        ----------
        X : array-like or torch.Tensor, shape (n_samples, n_features)
        y : array-like, shape (n_samples,) or (n_samples, n_outputs), optional
            Targets of the estimator; required unless ``M`` is given.

        Returns
        -------
        self
        """
        X = validate_data(self, as_numpy(X), dtype=[np.float64, np.float32])
        n_features = X.shape[1]
        self._check_selection(n_features)
        if self.M is not None:
            if self.estimator is not None:
                raise ValueError("give either M or estimator, not both")
            metric = check_square_matrix(self.M, "M", n_features)
            self.__dict__.pop("estimator_", None)  # from an earlier fit with an estimator
        else:
            if y is None:
                raise ValueError(
                    f"{type(self).__name__} requires y to be passed, but the target y is None: "
                    "y fits the estimator that learns M (or pass M directly)"
                )
            self.estimator_ = self._make_estimator(y).fit(X, y)
            metric = self._fitted_metric(n_features)
        self.metric_ = metric
        self.scores_ = scaled_diagonal(metric)
        self.support_ = self._select(self.scores_)
        return self

    def _make_estimator(self, y) -> BaseEstimator:
        if self.estimator is not None:
            return clone(self.estimator)
        if type_of_target(as_numpy(y), input_name="y") in _CLASSIFICATION_TARGETS:
            return RFMClassifier()
        return RFMRegressor()

    def _fitted_metric(self, n_features: int) -> np.ndarray:
        metric = getattr(self.estimator_, "M_", None)
        if metric is None:
            raise TypeError(
                f"estimator {type(self.estimator_).__name__} has no attribute M_ after fit; "
                "give an RFM (or any estimator exposing its learned metric as M_)"
            )
        return check_square_matrix(metric, "estimator M_", n_features)

    def _select(self, scores: np.ndarray) -> np.ndarray:
        support = np.zeros(len(scores), dtype=bool)
        if self.k is not None:
            support[np.argsort(-scores, kind="stable")[: self.k]] = True
        else:
            threshold = PAPER_THRESHOLD if self.threshold is None else self.threshold
            support[scores > threshold] = True
        return support

    def _get_support_mask(self) -> np.ndarray:
        check_is_fitted(self, "support_")
        return self.support_

    def plot_scores(self, shape: tuple[int, ...] | None = None, ax: Any = None) -> Any:
        """Draw the scores; kept coordinates are marked.

        Parameters
        ----------
        shape : tuple of int, optional
            Image shape (height, width) of the inputs (e.g. (8, 8) for digits): the scores
            are drawn as an image with the kept pixels outlined. Default: a bar per coordinate.
        ax : matplotlib.axes.Axes, optional
            Where to draw; default a new figure. matplotlib is imported here (``plot`` extra).

        Returns
        -------
        matplotlib.axes.Axes
        """
        check_is_fitted(self, "scores_")
        plt = pyplot()
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4), layout="constrained")
        kept = int(self.support_.sum())
        ax.set_title(f"min-max-scaled diag(M): {kept} of {len(self.scores_)} kept")
        if shape is None:
            positions = np.arange(len(self.scores_))
            colours = np.where(self.support_, "tab:red", "tab:gray")
            ax.bar(positions, self.scores_, color=colours)
            ax.set_xlabel("coordinate")
            ax.set_ylabel("score")
            return ax
        if len(shape) != 2 or np.prod(shape) != len(self.scores_):
            raise ValueError(
                f"shape must be (height, width) with {len(self.scores_)} pixels, got {shape!r}"
            )
        image = ax.imshow(self.scores_.reshape(shape), cmap="viridis", vmin=0, vmax=1)
        ax.figure.colorbar(image, ax=ax)
        rows, cols = np.nonzero(self.support_.reshape(shape))
        ax.scatter(cols, rows, s=120, marker="s", facecolors="none", edgecolors="tab:red")
        return ax
