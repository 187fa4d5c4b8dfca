"""AGOPFeatureSelector (RFM-T): the scores, the selection, scikit-learn compatibility, bad input."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import check_estimator

from deeprfm import AGOPFeatureSelector, RFMClassifier, RFMRegressor
from deeprfm.data import load_dataset
from deeprfm.selection import PAPER_THRESHOLD, scaled_diagonal

RELEVANT = [3, 17, 42]


@pytest.fixture(scope="module")
def sparse_task():
    """A target of 3 of 50 Gaussian coordinates: x₃·x₁₇ + x₄₂."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 50))
    return X, X[:, 3] * X[:, 17] + X[:, 42]


@pytest.fixture(scope="module")
def fitted(sparse_task):
    return AGOPFeatureSelector().fit(*sparse_task)


@pytest.fixture(scope="module")
def digits_small():
    return load_dataset("digits", n=300, random_state=0)


def test_scores_are_the_min_max_scaled_diagonal():
    M = np.diag([2.0, 4.0, 3.0, 12.0]) + 0.1
    expected = (np.diag(M) - 2.1) / (12.1 - 2.1)
    np.testing.assert_allclose(scaled_diagonal(M), expected)
    np.testing.assert_array_equal(scaled_diagonal(np.eye(3)), np.ones(3))


def test_keeps_exactly_the_coordinates_the_target_depends_on(sparse_task, fitted):
    X, y = sparse_task
    assert isinstance(fitted.estimator_, RFMRegressor)  # a continuous target
    assert fitted.get_support(indices=True).tolist() == RELEVANT
    np.testing.assert_allclose(fitted.scores_, scaled_diagonal(fitted.estimator_.M_))
    assert fitted.transform(X).shape == (len(X), 3)
    top = AGOPFeatureSelector(k=3, estimator=RFMRegressor()).fit(X, y)
    assert top.get_support(indices=True).tolist() == RELEVANT


def test_class_labels_get_a_classifier_and_the_estimator_is_cloned(digits_small):
    X, y = digits_small
    estimator = RFMClassifier(iters=1)
    selector = AGOPFeatureSelector(estimator).fit(X, y)
    assert not hasattr(estimator, "M_")
    assert selector.estimator_ is not estimator and hasattr(selector.estimator_, "M_")
    assert isinstance(AGOPFeatureSelector().fit(X, y).estimator_, RFMClassifier)


def test_threshold_and_k_select_by_the_scores(fitted):
    scores = fitted.scores_
    X = np.zeros((2, len(scores)))  # with M given, fit only checks the number of features
    for threshold in (0.0, PAPER_THRESHOLD, 0.5):
        selector = AGOPFeatureSelector(M=fitted.metric_, threshold=threshold).fit(X)
        np.testing.assert_array_equal(selector.get_support(), scores > threshold)
    selector = AGOPFeatureSelector(M=fitted.metric_, k=5).fit(X)
    assert set(selector.get_support(indices=True)) == set(np.argsort(-scores)[:5])


def test_a_given_metric_needs_no_target():
    M = np.diag(np.arange(1.0, 11.0))
    selector = AGOPFeatureSelector(RFMRegressor(iters=0)).fit(np.eye(10), np.arange(10.0))
    selector.set_params(estimator=None, M=M, k=2).fit(np.ones((4, 10)))
    assert selector.get_support(indices=True).tolist() == [8, 9]
    assert not hasattr(selector, "estimator_")  # no stale estimator of the earlier fit


def test_rfm_t_pipeline_in_a_grid_search(digits_small):
    X, y = digits_small
    pipeline = make_pipeline(AGOPFeatureSelector(RFMClassifier(iters=1)), RFMClassifier(iters=0))
    grid = {
        "agopfeatureselector__threshold": [0.05, 0.2],
        "agopfeatureselector__estimator__bandwidth": [5.0, 10.0],
    }
    search = GridSearchCV(pipeline, grid, cv=2).fit(X, y)
    assert set(search.best_params_) == set(grid)
    assert search.best_score_ > 0.8
    kept = search.best_estimator_[0].get_support().sum()
    assert search.best_estimator_[-1].n_features_in_ == kept < X.shape[1]
    assert clone(pipeline).get_params()["agopfeatureselector__threshold"] is None


def test_inputs_are_not_modified(sparse_task):
    X, y = sparse_task
    X_copy, y_copy = X.copy(), y.copy()
    AGOPFeatureSelector(RFMRegressor(iters=1)).fit(X, y)
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(y, y_copy)


@pytest.mark.parametrize(
    ("params", "fit_y", "error", "match"),
    [
        ({"threshold": 0.1, "k": 3}, True, ValueError, "threshold and k are mutually exclusive"),
        ({"threshold": 1.0}, True, ValueError, "threshold must be in"),
        ({"threshold": -0.1}, True, ValueError, "threshold must be >= 0"),
        ({"threshold": "high"}, True, TypeError, "threshold must be a number"),
        ({"k": 0}, True, ValueError, "k must be >= 1"),
        ({"k": 11}, True, ValueError, "k=11 exceeds the 10 features"),
        ({"k": 2.5}, True, TypeError, "k must be an integer"),
        ({"M": np.eye(3)}, False, ValueError, r"M must have shape \(10, 10\)"),
        ({"M": np.full((10, 10), np.nan)}, False, ValueError, "M contains NaN"),
        ({"M": np.eye(10), "estimator": RFMRegressor()}, True, ValueError, "either M or"),
        ({"estimator": Ridge()}, True, TypeError, "Ridge has no attribute M_"),
        ({}, False, ValueError, "requires y to be passed"),
    ],
)
def test_bad_input_raises_a_clear_error(params, fit_y, error, match):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 10))
    y = X[:, 0] if fit_y else None
    with pytest.raises(error, match=match):
        AGOPFeatureSelector(**params).fit(X, y)


def test_plot_scores_as_an_image_and_as_bars(digits_small):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    X, y = digits_small
    selector = AGOPFeatureSelector(RFMClassifier(iters=1)).fit(X, y)
    image = selector.plot_scores(shape=(8, 8))
    assert image.images[0].get_array().shape == (8, 8)
    assert len(image.collections[0].get_offsets()) == selector.get_support().sum()
    bars = selector.plot_scores()
    assert len(bars.patches) == 64
    with pytest.raises(ValueError, match="shape must be"):
        selector.plot_scores(shape=(4, 4))
    matplotlib.pyplot.close("all")


def test_scikit_learn_estimator_checks():
    # every check passes (check_array_api_input is skipped without SCIPY_ARRAY_API)
    selector = AGOPFeatureSelector(RFMRegressor(iters=1, dtype=torch.float64, device="cpu"))
    check_estimator(selector)
