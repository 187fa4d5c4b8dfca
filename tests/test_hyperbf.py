"""HyperBF networks: closed-form gradients against autograd, the AGOP mode against an RFM,
digits accuracy, reproducibility, scikit-learn conventions, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from deeprfm import (
    GaussianKernel,
    HyperBFClassifier,
    HyperBFRegressor,
    LaplaceKernel,
    RFMRegressor,
    agop,
    kernel_agop,
)
from deeprfm._hyperbf_network import (
    SGD,
    Adam,
    Network,
    batch_gradients,
    metric_factor,
    objective,
    predictor_agop,
    solve_coefficients,
)
from deeprfm.data import load_dataset

BANDWIDTH = 3.0


@pytest.fixture(scope="module")
def digits():
    X_train, y_train = load_dataset("digits", split="train")
    X_test, y_test = load_dataset("digits", split="test")
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_test), y_train, y_test


def _random_network(n: int, m: int, d: int, k: int, rank: int | None, seed: int = 0):
    """Inputs X (n, d), targets Y (n, k) and a network with m centres not at the inputs."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    r = d if rank is None else rank
    W = torch.eye(d, dtype=torch.float64)[:r] + 0.3 * draw(r, d)
    return draw(n, d), draw(n, k), Network(draw(m, d), W, draw(m, k))


def _reference_objective(profile, X, Y, centres, W, coef, reg, penalty, n):
    """The batch objective written directly: differences (b, m, d), no library code."""

    def gram(A, B):
        sq = (((A[:, None, :] - B[None, :, :]) @ W.T) ** 2).sum(dim=-1)
        if A is not B:
            return profile(sq)
        # the diagonal is φ(0) whatever the parameters; keep √0 (NaN derivative) out of autograd
        eye = torch.eye(len(A), dtype=torch.bool)
        return torch.where(eye, profile(torch.zeros(())), profile(torch.where(eye, 1.0, sq)))

    residual = gram(X, centres) @ coef - Y
    if penalty == "l2":
        regulariser = (coef**2).sum()
    else:
        regulariser = (coef * (gram(centres, centres) @ coef)).sum()
    return (residual**2).sum() / X.shape[0] + reg / n * regulariser


def _gaussian_profile(s):
    return torch.exp(-s / (2 * BANDWIDTH**2))


def _laplace_profile(s):
    return torch.exp(-s.sqrt() / BANDWIDTH)


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("penalty", ["l2", "rkhs"])
@pytest.mark.parametrize(
    ("kernel", "profile"),
    [(GaussianKernel(BANDWIDTH), _gaussian_profile), (LaplaceKernel(BANDWIDTH), _laplace_profile)],
    ids=["gaussian", "laplace"],
)
def test_gradients_equal_autograd_of_the_formula(rank, penalty, kernel, profile):
    X, Y, net = _random_network(n=9, m=6, d=5, k=3, rank=rank)
    reg, n = 0.7, 40
    loss, gradients = batch_gradients(kernel, X, Y, net, reg, penalty, n)

    def reference(centres, W, coef):
        return _reference_objective(profile, X, Y, centres, W, coef, reg, penalty, n)

    value = reference(net.centres, net.W, net.coef)
    expected = torch.func.grad(reference, argnums=(0, 1, 2))(net.centres, net.W, net.coef)
    assert loss == pytest.approx(float(value), rel=1e-12)
    ours = (gradients.centres, gradients.W, gradients.coef)
    for name, got, want in zip(("centres", "W", "coef"), ours, expected, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def _network_predictor(net: Network):
    """f(Z) = Σ_α c_α exp(−‖W(z − t_α)‖² / (2L²)), written directly."""

    def predictor(Z):
        diff = (Z[:, None, :] - net.centres[None, :, :]) @ net.W.T
        return _gaussian_profile((diff**2).sum(dim=-1)) @ net.coef

    return predictor


def test_kernel_agop_holds_for_centres_that_are_not_the_evaluation_points():
    X, _, net = _random_network(n=30, m=7, d=4, k=2, rank=None, seed=1)
    M = net.W.T @ net.W
    torch.testing.assert_close(
        kernel_agop(GaussianKernel(BANDWIDTH), net.centres, net.coef, M, X),
        agop(_network_predictor(net), X),
    )


@pytest.mark.parametrize("rank", [None, 2])
def test_predictor_agop_equals_autograd(rank):
    X, _, net = _random_network(n=25, m=6, d=5, k=3, rank=rank, seed=2)
    torch.testing.assert_close(
        predictor_agop(GaussianKernel(BANDWIDTH), X, net), agop(_network_predictor(net), X)
    )


@pytest.mark.parametrize("penalty", ["l2", "rkhs"])
def test_solve_minimises_the_objective_in_c(penalty):
    X, Y, net = _random_network(n=40, m=10, d=4, k=2, rank=None, seed=3)
    kernel = GaussianKernel(BANDWIDTH)
    net.coef = solve_coefficients(kernel, X, Y, net, 0.1, penalty)
    _, gradients = batch_gradients(kernel, X, Y, net, 0.1, penalty, n=40)
    assert float(gradients.coef.abs().max()) < 1e-10


def test_solve_with_the_training_points_as_centres_is_kernel_ridge_regression():
    X, Y, net = _random_network(n=30, m=1, d=4, k=2, rank=None, seed=4)
    net.centres, reg = X.clone(), 0.05
    kernel = GaussianKernel(BANDWIDTH)
    K = kernel(X, X, net.W.T @ net.W)
    expected = torch.linalg.solve(K + reg * torch.eye(30, dtype=X.dtype), Y)
    coef = solve_coefficients(kernel, X, Y, net, reg, "rkhs")
    torch.testing.assert_close(K @ coef, K @ expected)


def test_metric_factor_full_and_low_rank():
    A = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    M = A @ A.T
    torch.testing.assert_close(metric_factor(M, None).T @ metric_factor(M, None), M)
    W = metric_factor(M, 2)
    values, vectors = torch.linalg.eigh(M)
    best = (vectors[:, -2:] * values[-2:]) @ vectors[:, -2:].T
    assert W.shape == (2, 6)
    torch.testing.assert_close(W.T @ W, best)


@pytest.mark.parametrize(("Optimizer", "reference"), [(Adam, "Adam"), (SGD, "SGD")])
def test_optimizers_step_like_torch_optim(Optimizer, reference):
    generator = torch.Generator().manual_seed(6)
    ours = [torch.randn(4, 3, generator=generator, dtype=torch.float64)]
    theirs = [ours[0].clone().requires_grad_(True)]
    optimizer = Optimizer(ours, 0.05)
    torch_optimizer = getattr(torch.optim, reference)(theirs, lr=0.05)
    for _ in range(5):
        gradient = torch.randn(4, 3, generator=generator, dtype=torch.float64)
        optimizer.step([gradient])
        theirs[0].grad = gradient.clone()
        torch_optimizer.step()
    torch.testing.assert_close(ours[0], theirs[0].detach(), rtol=1e-13, atol=1e-15)


def test_gradient_descent_learns_digits(digits):
    X_train, X_test, y_train, y_test = digits
    model = HyperBFClassifier(
        metric_update="gd", bandwidth=BANDWIDTH, n_centres=300, epochs=15, random_state=0
    )
    model.fit(X_train, y_train, eval_set=(X_test, y_test))
    assert model.score(X_test, y_test) >= 0.95
    history = model.history_
    assert history.sizes == {"epoch": 16}
    assert history.train_loss[-1] < 0.2 * history.train_loss[0]
    assert history.eval_acc[-1] == pytest.approx(model.score(X_test, y_test))
    for name in ("train_loss", "train_acc", "eval_acc", "train_mse", "eval_mse", "seconds"):
        assert set(history[name].attrs) >= {"long_name", "definition"}, name
    assert model.M_.shape == (64, 64) and model.centres_.shape == (300, 64)
    assert not np.allclose(model.M_, np.eye(64)), "the metric should have been learned"


def test_same_seed_same_model_and_fixed_centres(digits):
    X_train, _, y_train, _ = digits
    params = {"bandwidth": BANDWIDTH, "n_centres": 50, "epochs": 2, "rank": 8}
    first = HyperBFClassifier(random_state=3, **params).fit(X_train[:400], y_train[:400])
    again = HyperBFClassifier(random_state=3, **params).fit(X_train[:400], y_train[:400])
    other = HyperBFClassifier(random_state=4, **params).fit(X_train[:400], y_train[:400])
    for name in ("coef_", "centres_", "W_", "M_"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.coef_, other.coef_)
    fixed = HyperBFClassifier(random_state=3, moving_centres=False, **params)
    fixed.fit(X_train[:400], y_train[:400])
    rows = [np.flatnonzero((X_train[:400] == centre).all(axis=1)) for centre in fixed.centres_]
    assert all(len(row) == 1 for row in rows) and len({int(r[0]) for r in rows}) == 50
    assert first.W_.shape == (8, 64) and np.linalg.matrix_rank(first.M_) <= 8


@pytest.mark.parametrize("iters", [1, 2])
def test_agop_mode_with_all_centres_is_an_rfm(digits, iters):
    X_train, X_test, y_train, _ = digits
    X, Y = X_train[:200], np.eye(10)[y_train[:200]]
    common = {"kernel": "gaussian", "bandwidth": 8.0, "reg": 1e-2, "dtype": torch.float64}
    rfm = RFMRegressor(iters=iters, solver="direct", early_stopping=False, **common).fit(X, Y)
    hyperbf = HyperBFRegressor(
        metric_update="agop", epochs=iters, n_centres=None, penalty="rkhs", **common
    ).fit(X, Y)
    np.testing.assert_allclose(hyperbf.M_, rfm.M_, rtol=0, atol=1e-9)
    np.testing.assert_allclose(hyperbf.coef_, rfm.alpha_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(hyperbf.predict(X_test), rfm.predict(X_test), atol=1e-8)


def test_agop_mode_low_rank_classifier(digits):
    X_train, X_test, y_train, y_test = digits
    model = HyperBFClassifier(
        metric_update="agop", bandwidth=BANDWIDTH, n_centres=200, rank=10, epochs=2,
        random_state=0,
    ).fit(X_train, y_train)  # fmt: skip
    assert model.W_.shape == (10, 64) and np.linalg.matrix_rank(model.M_) <= 10
    assert model.score(X_test, y_test) > 0.9
    assert model.history_.attrs["metric_update"] == "agop"


def test_clone_grid_search_pipeline_and_two_classes(digits):
    X_train, X_test, y_train, y_test = digits
    model = HyperBFClassifier(n_centres=40, epochs=3, bandwidth=BANDWIDTH, random_state=0)
    assert clone(model).get_params() == model.get_params()
    search = GridSearchCV(model, {"learning_rate": [1e-2, 3e-2]}, cv=2).fit(
        X_train[:300], y_train[:300]
    )
    assert set(search.best_params_) == {"learning_rate"}
    pipeline = make_pipeline(StandardScaler(), clone(model)).fit(X_train, y_train)
    assert pipeline.score(X_test, y_test) > 0.8
    two = y_train < 2
    binary = clone(model).fit(X_train[two], np.where(y_train[two] == 1, "one", "zero"))
    scores = binary.decision_function(X_test)
    assert scores.shape == (len(X_test),)
    np.testing.assert_array_equal(binary.predict(X_test), binary.classes_[(scores > 0) * 1])


# scikit-learn's own estimator checks. Exemptions, each with its reason:
_EXPECTED_FAILURES = {
    # the dtype parameter defaults to torch.float32, a type scikit-learn's check does not know
    "check_parameters_default_constructible": "dtype defaults to torch.float32",
}


@pytest.mark.parametrize("Estimator", [HyperBFClassifier, HyperBFRegressor])
def test_scikit_learn_estimator_checks(Estimator):
    estimator = Estimator(
        n_centres=30, epochs=30, bandwidth=2.0, learning_rate=3e-2, batch_size=32,
        dtype=torch.float64, device="cpu", random_state=0,
    )  # fmt: skip
    check_estimator(estimator, expected_failed_checks=_EXPECTED_FAILURES)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"metric_update": "newton"}, ValueError, "metric_update"),
        ({"optimizer": "lbfgs"}, ValueError, "optimizer"),
        ({"penalty": "l1"}, ValueError, "penalty"),
        ({"n_centres": 0}, ValueError, "n_centres"),
        ({"n_centres": 2.5}, TypeError, "n_centres"),
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 65}, ValueError, "rank must be at most n_features=64"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"reg": -1.0}, ValueError, "reg"),
        ({"agop_power": 0.0}, ValueError, "agop_power"),
        ({"normalize": "l2"}, ValueError, "normalize"),
        ({"moving_centres": "yes"}, TypeError, "moving_centres"),
        ({"kernel": "rbf"}, ValueError, "kernel"),
        ({"bandwidth": -1.0}, ValueError, "bandwidth"),
        ({"targets": "binary"}, ValueError, "targets"),
        ({"dtype": "float16"}, ValueError, "dtype"),
    ],
)
def test_bad_parameters_are_refused_naming_them(digits, params, error, match):
    X_train, _, y_train, _ = digits
    with pytest.raises(error, match=match):
        model = HyperBFClassifier(**({"epochs": 1, "n_centres": 10} | params))
        model.fit(X_train[:50], y_train[:50])


def test_bad_data_is_refused(digits):
    X_train, X_test, y_train, y_test = digits
    model = HyperBFClassifier(epochs=1, n_centres=10, bandwidth=BANDWIDTH)
    with pytest.raises(ValueError, match="eval_set X has 3 features"):
        model.fit(X_train[:50], y_train[:50], eval_set=(X_test[:5, :3], y_test[:5]))
    with pytest.raises(ValueError, match="eval_set y has labels not seen"):
        model.fit(X_train[:50], y_train[:50] % 3, eval_set=(X_test[:5], y_test[:5] + 20))
    with pytest.raises(ValueError, match="overflow float32"):
        model.fit(X_train[:50] * 1e30, y_train[:50])
    with pytest.raises(ValueError, match="diverged: lower learning_rate=1e\\+06"):
        HyperBFClassifier(epochs=3, optimizer="sgd", learning_rate=1e6).fit(X_train, y_train)
    fitted = model.fit(X_train[:50], y_train[:50])
    with pytest.raises(ValueError, match="features"):
        fitted.predict(X_test[:, :10])
    before = X_train[:50].copy()
    HyperBFRegressor(epochs=2, n_centres=10, bandwidth=BANDWIDTH).fit(X_train[:50], y_train[:50])
    np.testing.assert_array_equal(X_train[:50], before)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"metric_update": "agop", "n_centres": None}, "metric_update='agop' with m=200000"),
        ({"batch_size": 200_000, "n_centres": None}, "a gradient step on batch_size=200000"),
    ],
)
def test_steps_too_large_for_memory_are_refused_before_allocating(params, match):
    X = np.random.default_rng(0).standard_normal((200_000, 2), dtype=np.float32)
    with pytest.raises(MemoryError, match=match):
        HyperBFRegressor(device="cpu", **params).fit(X, X[:, 0])


def test_objective_is_the_mean_squared_error_plus_penalty():
    X, Y, net = _random_network(n=20, m=5, d=3, k=2, rank=None, seed=7)
    kernel = GaussianKernel(BANDWIDTH)
    value, fitted = objective(kernel, X, Y, net, 0.3, "rkhs")
    expected = _reference_objective(_gaussian_profile, X, Y, net.centres, net.W, net.coef, 0.3,
                                    "rkhs", 20)  # fmt: skip
    assert value == pytest.approx(float(expected), rel=1e-12)
    assert fitted.shape == (20, 2)
