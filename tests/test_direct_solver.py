"""The direct kernel ridge solve against a dense solve, its jitter and pseudo-inverse paths."""

import pytest
import torch

from deeprfm.kernels import LaplaceKernel
from deeprfm.solvers import DirectSolver, KernelSolver, make_solver


def _data(n=120, d=5, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g, dtype=dtype),
        torch.randn(n, c, generator=g, dtype=dtype),
    )


def test_direct_solve_matches_dense_solve():
    X, Y = _data()
    kernel = LaplaceKernel(2.0)
    fit = DirectSolver().solve(kernel, X, Y, reg=1e-2)
    K = kernel(X, X)
    expected = torch.linalg.solve(K + 1e-2 * torch.eye(len(X), dtype=X.dtype), Y)
    torch.testing.assert_close(fit.alpha, expected)
    torch.testing.assert_close(fit.fitted, K @ expected)
    assert fit.info == {"jitter": 0.0, "factor_dtype": "float64"}


def test_direct_solve_does_not_modify_inputs():
    X, Y = _data()
    X0, Y0 = X.clone(), Y.clone()
    DirectSolver().solve(LaplaceKernel(2.0), X, Y, reg=1e-3)
    assert torch.equal(X, X0) and torch.equal(Y, Y0)


def test_float32_failure_is_recomputed_in_float64():
    X, Y = _data(n=60)
    g = torch.Generator().manual_seed(1)
    near = X + 1e-5 * torch.randn(X.shape, generator=g, dtype=X.dtype)  # near-duplicates:
    X, Y = torch.cat([X, near]).float(), torch.cat([Y, Y]).float()  # float32 K is indefinite
    kernel = LaplaceKernel(1.0)
    assert torch.linalg.cholesky_ex(kernel(X, X) + 1e-8 * torch.eye(120)).info > 0
    fit = DirectSolver().solve(kernel, X, Y, reg=1e-8)
    assert fit.info == {"jitter": 0.0, "factor_dtype": "float64"}
    assert fit.alpha.dtype == torch.float32 and torch.isfinite(fit.alpha).all()
    X64 = X.double()
    expected = torch.linalg.solve(kernel(X64, X64) + 1e-8 * torch.eye(120).double(), Y.double())
    torch.testing.assert_close(fit.alpha.double(), expected, rtol=1e-4, atol=1e-3)


def test_jitter_fallback_on_a_singular_matrix():
    X, Y = _data(n=60, dtype=torch.float64)
    X = torch.cat([X, X])  # every point twice: K is singular
    Y = torch.cat([Y, Y])
    kernel = LaplaceKernel(50.0)
    with pytest.warns(RuntimeWarning, match="jitter"):
        fit = DirectSolver().solve(kernel, X, Y, reg=1e-30)
    assert fit.info["jitter"] > 0
    assert torch.isfinite(fit.alpha).all()
    residual = (kernel(X, X) @ fit.alpha - Y).norm() / Y.norm()
    assert residual < 1e-2


def test_zero_ridge_uses_the_pseudo_inverse():
    X, Y = _data(n=40)
    X = torch.cat([X, X])
    Y = torch.cat([Y, Y])
    kernel = LaplaceKernel(2.0)
    fit = DirectSolver().solve(kernel, X, Y, reg=0.0)
    K = kernel(X, X)
    torch.testing.assert_close(fit.alpha, torch.linalg.pinv(K, hermitian=True) @ Y)
    torch.testing.assert_close(fit.fitted, K @ fit.alpha)
    torch.testing.assert_close(fit.fitted, Y)  # duplicated points with equal targets: exact


def test_make_solver():
    assert isinstance(make_solver("direct", 10), DirectSolver)
    assert isinstance(make_solver("auto", 10, memory_gb=1.0), DirectSolver)
    solver = DirectSolver()
    assert make_solver(solver, 10) is solver
    assert isinstance(solver, KernelSolver)
    with pytest.raises(ValueError, match="solver must be one of"):
        make_solver("cholesky", 10)
