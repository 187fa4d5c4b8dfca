"""RFM estimators: learning, scikit-learn compatibility and bad input."""

import itertools
import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

import deeprfm._memory
import deeprfm._validation
import deeprfm.rfm
from deeprfm import (
    DeepRFM,
    HyperBFClassifier,
    HyperBFRegressor,
    LaplaceKernel,
    ModelFileError,
    RFMClassifier,
    RFMRegressor,
)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def xor_task():
    rng = np.random.default_rng(0)
    n, d = 2000, 100
    X = rng.standard_normal((n + 1000, d))
    y = ((X[:, 0] > 0) ^ (X[:, 1] < 0.5)).astype(int)
    return X[:n], X[n:], y[:n], y[n:]


def test_rfm_learns_features_kernel_regression_cannot(xor_task):
    X_train, X_test, y_train, y_test = xor_task
    model = RFMClassifier(bandwidth=10.0, reg=1e-3, iters=5, random_state=0)
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    accuracy = model.history_["eval_acc"].values
    assert 0.55 < accuracy[0] < 0.70  # plain Laplace kernel regression
    assert accuracy[5] >= 0.80
    # the learned metric concentrates on the two relevant coordinates
    diagonal = np.diag(model.M_)
    assert set(np.argsort(diagonal)[-2:]) == {0, 1}


def test_digits_accuracy(digits):
    X_train, X_test, y_train, y_test = digits
    last = RFMClassifier(iters=5, random_state=0).fit(X_train, y_train)
    assert last.score(X_test, y_test) >= 0.96
    assert last.best_iter_ == 5
    best = RFMClassifier(iters=5, random_state=0).fit(X_train, y_train, eval_set=(X_test, y_test))
    assert best.score(X_test, y_test) >= 0.97
    assert best.history_["eval_acc"].values[best.best_iter_] == best.history_["eval_acc"].max()


def test_history_dataset(digits):
    X_train, X_test, y_train, y_test = digits
    model = RFMClassifier(iters=2).fit(X_train, y_train, eval_set=(X_test, y_test))
    history = model.history_
    assert history.sizes == {"iteration": 3}
    for name in ("train_acc", "eval_acc", "train_mse", "eval_mse", "seconds"):
        assert history[name].attrs["long_name"]
        assert history[name].attrs["definition"]
    assert history.attrs["estimator"] == "RFMClassifier"


def test_any_label_type_and_decision_function(digits):
    X_train, X_test, y_train, _ = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "e", "n"])
    model = RFMClassifier(iters=1).fit(X_train, names[y_train])
    assert set(model.predict(X_test)) <= set(names)
    assert model.decision_function(X_test).shape == (len(X_test), 10)
    binary = RFMClassifier(iters=1).fit(X_train, y_train % 2 == 0)
    scores = binary.decision_function(X_test)
    assert scores.shape == (len(X_test),)
    np.testing.assert_array_equal(binary.predict(X_test), binary.classes_[(scores > 0).astype(int)])


def test_warm_start_with_M_init(digits):
    X_train, X_test, y_train, _ = digits
    first = RFMClassifier(iters=2, random_state=0).fit(X_train, y_train)
    warm = RFMClassifier(iters=0).fit(X_train, y_train, M_init=first.M_)
    np.testing.assert_allclose(warm.M_, first.M_)
    np.testing.assert_array_equal(warm.predict(X_test), first.predict(X_test))


def test_regressor_single_and_multi_output():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 10))
    y = np.sin(2 * X[:, 0]) + X[:, 1] ** 2
    model = RFMRegressor(bandwidth=5.0, iters=3).fit(X[:300], y[:300])
    assert model.predict(X[300:]).shape == (100,)
    assert model.score(X[300:], y[300:]) > 0.8
    multi = RFMRegressor(iters=1).fit(X[:300], np.stack([y, -y], axis=1)[:300])
    assert multi.predict(X[300:]).shape == (100, 2)


def test_torch_inputs_and_float64(digits):
    X_train, X_test, y_train, _ = digits
    from_numpy = RFMClassifier(iters=1, dtype=torch.float64).fit(X_train, y_train)
    from_torch = RFMClassifier(iters=1, dtype="float64").fit(
        torch.as_tensor(X_train), torch.as_tensor(y_train)
    )
    np.testing.assert_allclose(from_torch.M_, from_numpy.M_)
    assert from_torch.X_fit_.dtype == torch.float64
    np.testing.assert_array_equal(
        from_torch.predict(torch.as_tensor(X_test)), from_numpy.predict(X_test)
    )


def test_tensors_on_the_device_are_used_where_they_are(digits, monkeypatch):
    X_train, X_test, y_train, y_test = digits
    X = torch.as_tensor(X_train, dtype=torch.float32)
    # no numpy round trip: the tensors never reach numpy-based validation
    monkeypatch.setattr(
        deeprfm._validation, "check_array", lambda *a, **k: pytest.fail("went through numpy")
    )
    shared = RFMClassifier(iters=1, copy_X=False, device="cpu").fit(X, y_train)
    assert shared.X_fit_ is X and shared.n_features_in_ == X.shape[1]
    copied = RFMClassifier(iters=1, device="cpu").fit(X, y_train)
    assert copied.X_fit_ is not X and copied.X_fit_.data_ptr() != X.data_ptr()
    torch.testing.assert_close(copied.X_fit_, X)
    X_eval = torch.as_tensor(X_test, dtype=torch.float32)
    assert shared.score(X_eval, y_test) == copied.score(X_eval, y_test) > 0.9
    monkeypatch.undo()
    from_numpy = RFMClassifier(iters=1, device="cpu").fit(X_train.astype(np.float32), y_train)
    np.testing.assert_array_equal(copied.M_, from_numpy.M_)
    with pytest.raises(ValueError, match="X has 5 features"):
        shared.predict(X_eval[:, :5])
    with pytest.raises(ValueError, match="2-D tensor"):
        RFMClassifier(iters=1).fit(X[0], y_train[:1])
    with pytest.raises(ValueError, match="NaN"):
        RFMClassifier(iters=1).fit(torch.full_like(X, float("nan")), y_train)
    with pytest.raises(ValueError, match="inconsistent"):
        RFMClassifier(iters=1).fit(X, y_train[:-1])


def test_one_memory_budget_per_fit(digits, monkeypatch):
    X_train, _, y_train, _ = digits
    queries = itertools.count()  # the free memory falls by 64 MiB at every query
    monkeypatch.setattr(
        deeprfm._memory, "_available_host_bytes", lambda: 4 * 1024**3 - next(queries) * 2**26
    )
    budgets = []
    original = deeprfm.rfm.kernel_agop

    def spy(*args, memory_gb=None, **kwargs):
        budgets.append(memory_gb)
        return original(*args, memory_gb=memory_gb, **kwargs)

    monkeypatch.setattr(deeprfm.rfm, "kernel_agop", spy)
    model = RFMClassifier(iters=3, device="cpu").fit(X_train, y_train)
    assert len(budgets) == 3 and len(set(budgets)) == 1
    assert model.history_.attrs["memory_budget_gb"] == budgets[0]
    assert budgets[0] == pytest.approx(0.3 * 4)  # 30 % of the free memory at the start


def test_every_parameter_has_a_constraint():
    for Estimator in (RFMClassifier, RFMRegressor, DeepRFM, HyperBFClassifier, HyperBFRegressor):
        params = set(Estimator().get_params(deep=False))
        constrained = set(Estimator._constraints)
        assert constrained <= params
        # random_state takes what check_random_state takes; feature_params is checked key by
        # key against the feature map
        assert params - constrained <= {"random_state", "feature_params"}


def test_cuda_without_a_gpu_is_refused_up_front(digits):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match="CUDA is not available"):
        RFMClassifier(device="cuda").fit(X_train[:20], y_train[:20])


def test_inputs_are_not_modified(digits):
    X_train, _, y_train, _ = digits
    X = X_train.astype(np.float32)
    X_copy, y_copy = X.copy(), y_train.copy()
    RFMClassifier(iters=1, normalize="trace", centering=True).fit(X, y_train)
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(y_train, y_copy)


def test_agop_subsample_is_reproducible(digits):
    X_train, _, y_train, _ = digits
    a = RFMClassifier(iters=1, agop_samples=300, random_state=3).fit(X_train, y_train)
    b = RFMClassifier(iters=1, agop_samples=300, random_state=3).fit(X_train, y_train)
    c = RFMClassifier(iters=1, agop_samples=300, random_state=4).fit(X_train, y_train)
    np.testing.assert_array_equal(a.M_, b.M_)
    assert not np.array_equal(a.M_, c.M_)


def test_options_diag_power_kernel(digits):
    X_train, X_test, y_train, y_test = digits
    diag = RFMClassifier(iters=2, diag=True).fit(X_train, y_train)
    assert np.count_nonzero(diag.M_ - np.diag(np.diag(diag.M_))) == 0
    for params in (
        {"agop_power": 0.5},
        {"kernel": "gaussian", "bandwidth": 5.0},
        {"kernel": "gen_laplace", "exponent": 1.5},
        {"kernel": LaplaceKernel(10.0)},
    ):
        model = RFMClassifier(iters=1, **params).fit(X_train, y_train)
        assert model.score(X_test, y_test) > 0.9, params


def test_clone_grid_search_and_pipeline(digits):
    X_train, X_test, y_train, y_test = digits
    model = RFMClassifier(iters=1, bandwidth=5.0)
    copy = clone(model)
    assert copy.get_params() == model.get_params()
    search = GridSearchCV(
        RFMClassifier(iters=1), {"bandwidth": [5.0, 20.0], "reg": [1e-3, 1e-1]}, cv=2
    )
    search.fit(X_train[:600], y_train[:600])
    assert set(search.best_params_) == {"bandwidth", "reg"}
    pipeline = make_pipeline(StandardScaler(), RFMClassifier(iters=1)).fit(X_train, y_train)
    assert pipeline.score(X_test, y_test) > 0.9


# scikit-learn's own estimator checks. Exemptions, each with its reason:
_EXPECTED_FAILURES = {
    # the dtype parameter defaults to torch.float32, a type scikit-learn's check does not know
    "check_parameters_default_constructible": "dtype defaults to torch.float32",
}


@pytest.mark.parametrize("Estimator", [RFMClassifier, RFMRegressor])
def test_scikit_learn_estimator_checks(Estimator):
    estimator = Estimator(iters=1, dtype=torch.float64, device="cpu", random_state=0)
    check_estimator(estimator, expected_failed_checks=_EXPECTED_FAILURES)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"bandwidth": 0.0}, ValueError, "bandwidth"),
        ({"bandwidth": -2.0}, ValueError, "bandwidth"),
        ({"reg": -1e-3}, ValueError, "reg"),
        ({"iters": -1}, ValueError, "iters"),
        ({"iters": 1.5}, TypeError, "iters"),
        ({"exponent": 3.0}, ValueError, "exponent"),
        ({"kernel": "rbf"}, ValueError, "kernel"),
        ({"agop_power": 0.0}, ValueError, "agop_power"),
        ({"agop_samples": 0}, ValueError, "agop_samples"),
        ({"normalize": "l2"}, ValueError, "normalize"),
        ({"solver": "qr"}, ValueError, "solver"),
        ({"diag": "yes"}, TypeError, "diag"),
        ({"dtype": "float16"}, ValueError, "dtype"),
        ({"memory_gb": -1.0}, ValueError, "memory_gb"),
    ],
)
def test_bad_parameters(digits, params, error, match):
    X_train, _, y_train, _ = digits
    with pytest.raises(error, match=match):
        RFMClassifier(**params).fit(X_train[:50], y_train[:50])


def test_bad_data(digits):
    X_train, X_test, y_train, y_test = digits
    X = X_train[:100].copy()
    y = y_train[:100]
    bad_x = X.copy()
    bad_x[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        RFMClassifier().fit(bad_x, y)
    bad_x[3, 4] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        RFMClassifier().fit(bad_x, y)
    with pytest.raises(ValueError, match="2D array"):
        RFMClassifier().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        RFMClassifier().fit(X, y[:-1])
    with pytest.raises(ValueError, match="at least 2 classes"):
        RFMClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="NaN"):
        RFMRegressor().fit(X, np.where(np.arange(len(X)) == 2, np.nan, 1.0))
    with pytest.raises(NotFittedError):
        RFMClassifier().predict(X)
    model = RFMClassifier(iters=0).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :10])
    with pytest.raises(ValueError, match="eval_set"):
        RFMClassifier().fit(X, y, eval_set=(X_test[:, :10], y_test))
    with pytest.raises(ValueError, match="eval_set"):
        RFMClassifier().fit(X, y, eval_set=(X_test, y_test[:-1]))
    with pytest.raises(TypeError, match="eval_set"):
        RFMClassifier().fit(X, y, eval_set=X_test)
    with pytest.raises(ValueError, match="M_init"):
        RFMClassifier().fit(X, y, M_init=np.eye(3))


@pytest.mark.parametrize("Estimator", [RFMClassifier, RFMRegressor])
def test_save_and_load_round_trip(Estimator, digits, tmp_path):
    X_train, X_test, y_train, _ = digits
    model = Estimator(iters=1, bandwidth=8.0, random_state=0).fit(X_train[:300], y_train[:300])
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = Estimator.load(path)
    assert loaded.get_params() == model.get_params()
    np.testing.assert_array_equal(loaded.predict(X_test), model.predict(X_test))
    np.testing.assert_array_equal(loaded.M_, model.M_)
    assert loaded.best_iter_ == model.best_iter_


def test_load_refuses_other_files(digits, tmp_path):
    X_train, _, y_train, _ = digits
    path = tmp_path / "model.pt"
    RFMRegressor(iters=0).fit(X_train[:50], y_train[:50]).save(path)
    with pytest.raises(ValueError, match="RFMRegressor, not a RFMClassifier"):
        RFMClassifier.load(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a deeprfm model file"):
        RFMClassifier.load(tmp_path / "other.pt")


class _CodeRunningPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_never_executes_pickled_code(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"format": "deeprfm-1", "config": _CodeRunningPayload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=r"bad\.pt.*UnpicklingError") as info:
        RFMClassifier.load(tmp_path / "bad.pt")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


def test_a_float32_agop_made_indefinite_by_rounding_is_clamped():
    # float32 rounding of M · S · M once left M with an eigenvalue of -1.4e-5 of its largest
    # here, the Laplace kernel matrix indefinite, and the direct solve failing
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 50))
    y = X[:, 3] + X[:, 17] - X[:, 42]
    model = RFMRegressor(iters=5, device="cpu").fit(X, y)
    assert np.linalg.eigvalsh(model.M_)[0] >= -1e-6 * np.abs(model.M_).max()
    assert model.score(X, y) > 0.9
