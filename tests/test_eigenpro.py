"""EigenPro solver: agreement with the direct solve, stability, stopping rules, bad input."""

import logging
import math

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import random_psd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import deeprfm.solvers.eigenpro as eigenpro_module
from deeprfm import RFMClassifier
from deeprfm.kernels import GaussianKernel, LaplaceKernel
from deeprfm.solvers import DirectSolver, EigenProSolver, make_solver
from deeprfm.solvers.eigenpro import _batch_size, _step_size
from deeprfm.solvers.preconditioner import damped_diagonal_max


def _teacher_problem(n: int, d: int = 10, classes: int = 4, seed: int = 0, scale: float = 1.0):
    """Inputs (n, d) and one-hot labels of a nonlinear random teacher, as float32 tensors."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    W = torch.randn(d, classes, generator=g)
    labels = (torch.sin(X @ W) + 0.5 * X[:, :classes] ** 2).argmax(dim=1)
    return X * scale, torch.eye(classes)[labels]


@pytest.fixture(scope="module")
def problem():
    X, Y = _teacher_problem(4000)
    return X[:3000], Y[:3000], X[3000:], Y[3000:]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize(
    ("kernel", "reg"),
    [
        (LaplaceKernel(6.0), 0.0),
        (LaplaceKernel(6.0), 1e-2),
        (GaussianKernel(1.0), 0.0),
        (GaussianKernel(3.0), 1.0),
    ],
    ids=["laplace", "laplace-ridge", "gaussian", "gaussian-ridge"],
)
def test_matches_the_direct_solve(problem, kernel, reg):
    X, Y, X_test, Y_test = problem
    K = kernel(X.double(), X.double())
    alpha = torch.linalg.solve(K + reg * torch.eye(len(X), dtype=K.dtype), Y.double())
    expected = kernel.apply(X_test.double(), X.double(), alpha).float()
    fit = EigenProSolver(epochs=20, random_state=0).solve(kernel, X, Y, reg=reg)
    predicted = kernel.apply(X_test, X, fit.alpha)

    assert _relative(predicted, expected) < 0.02
    accuracy = (predicted.argmax(1) == Y_test.argmax(1)).double().mean()
    expected_accuracy = (expected.argmax(1) == Y_test.argmax(1)).double().mean()
    assert abs(float(accuracy - expected_accuracy)) <= 0.005
    mse, expected_mse = ((predicted - Y_test) ** 2).mean(), ((expected - Y_test) ** 2).mean()
    assert abs(float(mse - expected_mse)) <= 0.005 * float(expected_mse)
    assert fit.info["step_halvings"] == 0
    assert fit.info["train_residual"] < 0.05
    assert 0 < fit.info["top_q"] < fit.info["subsample_size"]


@pytest.mark.parametrize(
    "kernel",
    [
        *(LaplaceKernel(bandwidth) for bandwidth in (1.0, 1e4, 1e6)),
        *(GaussianKernel(bandwidth) for bandwidth in (1.0, 1e3, 1e5)),
    ],
    ids=lambda k: f"{k.name}-{k.bandwidth:g}",
)
def test_badly_scaled_data_does_not_diverge(kernel, recwarn):
    X, Y = _teacher_problem(2000, scale=100.0)  # distances ~450: bandwidths far off both ways
    fit = EigenProSolver(epochs=15, subsample_size=1000, random_state=0).solve(
        kernel, X, Y, reg=1e-3
    )
    residuals = fit.info["history"]["train_residual"].values
    assert torch.isfinite(fit.alpha).all()
    # bounded near or below the residual 1 of α = 0 (a diverging run grows geometrically; at
    # the largest Gaussian bandwidth the kernel is rank one to rounding and nothing beyond the
    # mean is learnable, so the residual fluctuates around 0.9)
    assert np.all(np.isfinite(residuals)) and residuals.max() <= 1.05
    assert fit.info["step_halvings"] == 0
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_deterministic_with_a_fixed_random_state(problem):
    X, Y, _, _ = problem
    kernel = LaplaceKernel(6.0)

    def solve(seed):
        return EigenProSolver(epochs=2, subsample_size=500, random_state=seed).solve(kernel, X, Y)

    first, again, other = solve(3), solve(3), solve(4)
    assert torch.equal(first.alpha, again.alpha)
    assert torch.equal(first.fitted, again.fitted)
    assert not torch.equal(first.alpha, other.alpha)


def test_validation_keeps_the_best_epoch_and_stops_with_patience(problem):
    X, Y, X_val, Y_val = problem
    kernel = LaplaceKernel(6.0)
    solver = EigenProSolver(epochs=40, subsample_size=1000, patience=2, random_state=0)
    fit = solver.solve(kernel, X, Y, eval_set=(X_val, Y_val))
    history = fit.info["history"]
    assert isinstance(history, xr.Dataset)
    assert set(history.data_vars) == {"train_residual", "eval_mse", "seconds"}
    for name in history.data_vars:
        assert history[name].attrs["long_name"] and history[name].attrs["definition"]
    assert fit.info["stop_reason"] == "patience"
    assert fit.info["epochs"] == history.sizes["epoch"] < 40
    best = int(np.argmin(history["eval_mse"].values)) + 1
    assert fit.info["best_epoch"] == best
    eval_mse = float(((kernel.apply(X_val, X, fit.alpha) - Y_val) ** 2).mean())
    assert eval_mse == pytest.approx(float(history["eval_mse"].min()), rel=1e-5)


def test_tolerance_on_the_training_residual(problem):
    X, Y, _, _ = problem
    fit = EigenProSolver(epochs=40, tol=0.05, subsample_size=1000, random_state=0).solve(
        LaplaceKernel(6.0), X, Y
    )
    residuals = fit.info["history"]["train_residual"].values
    assert fit.info["stop_reason"] == "tol"
    assert residuals[-1] <= 0.05 < residuals[-2]


def test_fitted_values_tracked_or_exact(problem):
    X, Y, _, _ = problem
    kernel = LaplaceKernel(6.0)
    tracked = EigenProSolver(epochs=10, subsample_size=1000, random_state=0).solve(kernel, X, Y)
    exact = EigenProSolver(epochs=10, subsample_size=1000, random_state=0, exact_fitted=True).solve(
        kernel, X, Y
    )
    assert torch.equal(tracked.alpha, exact.alpha)
    K_alpha = kernel.apply(X, X, exact.alpha)
    torch.testing.assert_close(exact.fitted, K_alpha)
    assert _relative(tracked.fitted, K_alpha) < 0.05
    residual = _relative(K_alpha, Y)
    assert exact.info["train_residual"] == pytest.approx(residual, rel=1e-4)


def test_metric_low_rank_and_full(problem):
    X, Y, X_test, _ = problem
    kernel = LaplaceKernel(6.0)
    g = torch.Generator().manual_seed(5)
    low_rank = torch.randn(10, 4, generator=g, dtype=torch.float64)
    for M in (random_psd(10, g), low_rank @ low_rank.T):
        direct = DirectSolver().solve(kernel, X.double(), Y.double(), M, reg=1.0)
        expected = kernel.apply(X_test.double(), X.double(), direct.alpha, M)
        fit = EigenProSolver(epochs=20, subsample_size=1000, random_state=0).solve(
            kernel, X, Y, M.float(), reg=1.0
        )
        predicted = kernel.apply(X_test, X, fit.alpha, M.float())
        assert _relative(predicted.double(), expected) < 0.02


def test_plain_sgd_without_preconditioning(problem):
    X, Y, _, _ = problem
    fit = EigenProSolver(epochs=3, top_q=0, subsample_size=500, random_state=0).solve(
        GaussianKernel(1.0), X, Y
    )
    assert fit.info["top_q"] == 0
    half_critical = math.floor((fit.info["critical_batch_size"] + 1) / 2)
    assert fit.info["batch_size"] == max(half_critical, 64)
    residuals = fit.info["history"]["train_residual"].values
    assert np.all(np.diff(residuals) < 0)


def test_beta_is_the_largest_damped_diagonal_for_every_q():
    X, _ = _teacher_problem(500)
    kernel = LaplaceKernel(6.0)
    centres = X[:100]
    values, vectors = torch.linalg.eigh(kernel(centres, centres).double() / 100)
    values, E = values.flip(0)[:20], (vectors.flip(1)[:, :20] / 10).float()
    betas = damped_diagonal_max(kernel, X, centres, E, values, budget=2**20)  # many blocks
    A = kernel(X, centres).double() @ E.double()  # (n, 20): K(x_i, X_S) E_j
    for q in range(20):
        D = (1 - values[q] / values[:q]) / values[:q]
        expected = (kernel.max_diagonal - A[:, :q] ** 2 @ D).max()
        assert float(betas[q]) == pytest.approx(float(expected), rel=1e-4)
    assert torch.all(betas[1:] < betas[0])


def test_the_solver_uses_the_exact_beta_of_its_preconditioner():
    X, Y = _teacher_problem(600)
    kernel, reg = LaplaceKernel(6.0), 0.1
    solver = EigenProSolver(epochs=1, subsample_size=200, random_state=0)
    pre, beta = solver._preconditioner(kernel, X, torch.Generator().manual_seed(0), 2**30)
    A = kernel(X, X[pre.indices]).double() @ pre.E.double()
    assert pre.q > 0
    assert beta == pytest.approx(float((1 - A**2 @ pre.D.double()).max()), rel=1e-4)
    info = solver.solve(kernel, X, Y, reg=reg).info
    assert info["beta"] == pytest.approx(beta + reg)
    assert info["tail_eigenvalue"] == pytest.approx(pre.tail)


def test_batch_size_and_step_size_rules():
    safety = eigenpro_module._SAFETY
    beta, tail = 0.5, 1e-3  # critical batch m* = 501
    assert _batch_size(beta, tail, cap=10_000, batch_size=None, n=10**6) == 251  # half of m*
    assert _batch_size(beta, tail, cap=100, batch_size=None, n=10**6) == 100
    assert _batch_size(beta, 0.1, cap=100, batch_size=None, n=10**6) == 64
    assert _batch_size(beta, tail, cap=10_000, batch_size=None, n=200) == 200
    assert _batch_size(beta, tail, cap=10_000, batch_size=2000, n=10**6) == 2000
    with pytest.warns(UserWarning, match="batch_size=2000 exceeds the 100 rows"):
        assert _batch_size(beta, tail, cap=100, batch_size=2000, n=10**6) == 100
    assert _step_size(beta, tail, 251) == pytest.approx(safety * 251 / beta)
    assert _step_size(beta, tail, 2000) == pytest.approx(safety * 2 * 2000 / (beta + 1999 * tail))
    assert _step_size(beta, tail, 501) == pytest.approx(safety * 501 / beta)  # rules meet at m*


def test_a_small_memory_budget_gives_small_batches(problem):
    X, Y, X_test, _ = problem
    kernel = LaplaceKernel(6.0)
    small = EigenProSolver(epochs=10, subsample_size=1000, memory_gb=0.005, random_state=0)
    small = small.solve(kernel, X, Y, reg=1e-2)
    large = EigenProSolver(epochs=10, subsample_size=1000, random_state=0).solve(
        kernel, X, Y, reg=1e-2
    )
    # one (m, n) block of 3 float32 temporaries in 0.005 GiB: m = 149
    assert small.info["batch_size"] == 149 < large.info["batch_size"]
    predicted = kernel.apply(X_test, X, small.alpha)
    assert _relative(predicted, kernel.apply(X_test, X, large.alpha)) < 0.02


def test_a_too_large_step_is_halved_until_stable(problem, monkeypatch):
    X, Y, _, _ = problem
    kernel = LaplaceKernel(6.0)
    monkeypatch.setattr(eigenpro_module, "_SAFETY", 20.0)
    with pytest.warns(RuntimeWarning, match="half the step size") as record:
        fit = EigenProSolver(epochs=20, subsample_size=1000, random_state=0).solve(kernel, X, Y)
    assert record[0].filename == __file__
    assert fit.info["step_halvings"] >= 3
    assert fit.info["train_residual"] < 0.1
    monkeypatch.setattr(eigenpro_module, "_MAX_HALVINGS", 1)
    with pytest.raises(RuntimeError, match="diverged"), pytest.warns(RuntimeWarning):
        EigenProSolver(epochs=2, subsample_size=1000, random_state=0).solve(kernel, X, Y)


def test_subsample_larger_than_n_is_clamped_with_a_warning():
    X, Y = _teacher_problem(300)
    with pytest.warns(UserWarning, match="subsample_size=500") as record:
        fit = EigenProSolver(epochs=1, subsample_size=500).solve(LaplaceKernel(6.0), X, Y)
    assert fit.info["subsample_size"] == 300
    assert record[0].filename == __file__  # points at the caller


def test_default_subsample_size_grows_with_n_within_budget():
    solver = EigenProSolver()
    budget = 4 * 1024**3
    sizes = [solver._subsample_size(n, budget) for n in (500, 3000, 50_000, 300_000)]
    assert sizes == [500, 2000, 5000, 12000]
    with pytest.warns(RuntimeWarning, match="affords a preconditioner subsample of 1672"):
        assert solver._subsample_size(300_000, 64 * 1024**2) == 1672  # 3 s×s float64 in 64 MiB
    with pytest.raises(ValueError, match="at least 256 points"):
        solver._subsample_size(300_000, 1024**2)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"epochs": 0}, ValueError, "epochs"),
        ({"epochs": -3}, ValueError, "epochs"),
        ({"epochs": 2.5}, TypeError, "epochs"),
        ({"subsample_size": 0}, ValueError, "subsample_size"),
        ({"top_q": -1}, ValueError, "top_q"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"patience": 0}, ValueError, "patience"),
        ({"memory_gb": -1.0}, ValueError, "memory_gb"),
        ({"random_state": "seed"}, TypeError, "random_state"),
        ({"verbose": 1}, TypeError, "verbose"),
    ],
)
def test_bad_parameters(params, error, match):
    with pytest.raises(error, match=match):
        EigenProSolver(**params)


def test_top_q_must_be_below_the_subsample_size():
    X, Y = _teacher_problem(400)
    with pytest.raises(ValueError, match="top_q must be smaller than the subsample size 100"):
        EigenProSolver(subsample_size=100, top_q=100).solve(LaplaceKernel(6.0), X, Y)


def test_top_q_at_the_rounding_level_is_reduced_with_a_warning():
    X, Y = _teacher_problem(400)
    with pytest.warns(UserWarning, match="rounding level") as record:
        fit = EigenProSolver(epochs=1, subsample_size=300, top_q=299).solve(
            GaussianKernel(100.0), X, Y
        )
    assert fit.info["top_q"] < 299
    assert record[0].filename == __file__


@pytest.mark.parametrize("solver", [EigenProSolver(epochs=1), DirectSolver()], ids=repr)
def test_bad_data(solver):
    X, Y = _teacher_problem(200)
    kernel = LaplaceKernel(6.0)
    bad_x = X.clone()
    bad_x[3, 1] = float("nan")
    asymmetric = torch.eye(10)
    asymmetric[0, 1] = 0.5
    cases = [
        ((kernel, bad_x, Y), {}, ValueError, "X contains NaN"),
        ((kernel, X, Y[:, 0]), {}, ValueError, "Y must be a 2-D"),
        ((kernel, X, Y[:-1]), {}, ValueError, "different numbers of rows"),
        ((kernel, X.numpy(), Y), {}, TypeError, "X must be a torch.Tensor, got ndarray"),
        ((kernel, X[:0], Y[:0]), {}, ValueError, "n >= 1"),
        ((kernel, X, Y), {"reg": float("nan")}, ValueError, "reg must be finite"),
        ((kernel, X, Y), {"M": torch.full((10, 10), float("nan"))}, ValueError, "NaN"),
        ((kernel, X.half(), Y), {}, TypeError, "float32 or float64"),
        (("laplace", X, Y), {}, TypeError, "kernel must be a Kernel"),
        ((kernel, X, Y), {"reg": -1.0}, ValueError, "reg"),
        ((kernel, X, Y), {"M": torch.eye(3)}, ValueError, r"M must have shape \(10, 10\)"),
        ((kernel, X, Y), {"M": asymmetric}, ValueError, "M must be symmetric"),
        ((kernel, X, Y), {"M": -torch.eye(10)}, ValueError, "positive semi-definite"),
    ]
    if isinstance(solver, EigenProSolver):  # the direct solve ignores eval_set
        cases += [
            ((kernel, X, Y), {"eval_set": (X[:5, :3], Y[:5])}, ValueError, "eval_set X"),
            ((kernel, X, Y), {"eval_set": (X[:5], Y[:4])}, ValueError, "eval_set Y"),
            ((kernel, X, Y), {"eval_set": X}, TypeError, "eval_set must be a pair"),
        ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            solver.solve(*args, **kwargs)


def test_zero_targets_give_zero_coefficients():
    X, Y = _teacher_problem(200)
    fit = EigenProSolver(epochs=2).solve(LaplaceKernel(6.0), X, torch.zeros_like(Y))
    assert not fit.alpha.any() and not fit.fitted.any()
    assert fit.info["train_residual"] == 0


def test_progress_bar_and_logging(problem, capsys, caplog):
    X, Y, X_val, Y_val = problem
    with caplog.at_level(logging.DEBUG, logger="deeprfm"):
        EigenProSolver(epochs=2, subsample_size=300, verbose=True).solve(
            LaplaceKernel(6.0), X, Y, eval_set=(X_val, Y_val)
        )
    assert "EigenPro" in capsys.readouterr().err
    assert "EigenPro setup" in caplog.text and "eval_mse" in caplog.text


def test_make_solver_auto_picks_by_memory_budget():
    assert isinstance(make_solver("auto", 1000), DirectSolver)
    assert isinstance(make_solver("auto", 1000, memory_gb=1.0, device="cpu"), DirectSolver)
    small_budget = make_solver(
        "auto", 1000, itemsize=4, memory_gb=0.001, random_state=7, verbose=True
    )
    assert isinstance(small_budget, EigenProSolver)
    assert (small_budget.memory_gb, small_budget.random_state) == (0.001, 7)
    assert small_budget.verbose is True
    # the direct solve of n = 1000 in float64 needs 2·n²·8 = 16e6 bytes
    just_enough, too_little = 16e6 / 1024**3, 15.9e6 / 1024**3
    assert isinstance(make_solver("auto", 1000, itemsize=8, memory_gb=just_enough), DirectSolver)
    assert isinstance(make_solver("auto", 1000, itemsize=8, memory_gb=too_little), EigenProSolver)
    assert isinstance(make_solver("eigenpro", 10), EigenProSolver)
    with pytest.raises(ValueError, match="solver must be one of"):
        make_solver("cg", 10)


def test_rfm_classifier_with_eigenpro_matches_direct_accuracy():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y
    )
    scores = {
        solver: RFMClassifier(iters=2, solver=solver, random_state=0)
        .fit(X_train, y_train)
        .score(X_test, y_test)
        for solver in ("direct", "eigenpro")
    }
    assert scores["direct"] >= 0.96
    assert abs(scores["eigenpro"] - scores["direct"]) <= 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(problem):
    X, Y, X_test, _ = problem
    kernel = LaplaceKernel(6.0)
    solver = EigenProSolver(epochs=10, subsample_size=1000, random_state=0)
    cpu = solver.solve(kernel, X, Y)
    cuda = solver.solve(kernel, X.cuda(), Y.cuda())
    assert cuda.alpha.device.type == "cuda"
    predicted = kernel.apply(X_test.cuda(), X.cuda(), cuda.alpha).cpu()
    assert _relative(predicted, kernel.apply(X_test, X, cpu.alpha)) < 1e-2
