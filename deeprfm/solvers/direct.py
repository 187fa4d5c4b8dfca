"""Direct kernel ridge regression: a Cholesky factorisation of K + λI."""

from __future__ import annotations

import logging
import warnings

import torch

from analysis._common import user_stacklevel
from deeprfm._memory import check_fits, memory_budget
from deeprfm.kernels import Kernel
from deeprfm.solvers.base import KernelFit, KernelSolver, check_solve_inputs

logger = logging.getLogger("deeprfm")

#: Attempts, each with ten times the jitter of the last, before the solve gives up.
_JITTER_ATTEMPTS = 8


class DirectSolver(KernelSolver):
    """Kernel ridge regression by a dense factorisation of the n×n kernel matrix.

    λ > 0: Cholesky of K + λI. If it fails in float32 (float32 rounding of the distances
    between near-duplicate points, as in strongly collapsed features, can make K indefinite),
    K is recomputed and factored in float64; if that fails too, the factorisation is retried
    with a growing jitter added to the diagonal, with a warning. λ = 0: a
    minimum-norm least-squares solution through the pseudo-inverse (``eigh``).
    Memory: two n×n matrices.

    Parameters
    ----------
    memory_gb : float, optional
        Budget for building the kernel matrix in blocks.
    """

    name = "direct"

    def __init__(self, memory_gb: float | None = None) -> None:
        self.memory_gb = memory_gb

    def solve(
        self,
        kernel: Kernel,
        X: torch.Tensor,
        Y: torch.Tensor,
        M: torch.Tensor | None = None,
        reg: float = 0.0,
        eval_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> KernelFit:
        X, Y, M, reg = check_solve_inputs(kernel, X, Y, M, reg)
        n = X.shape[0]
        check_fits(
            2 * n * n * X.element_size(),
            memory_budget(self.memory_gb, X.device),
            X.device,
            f"solver='direct' at n={n} (two n x n matrices)",
            "use solver='eigenpro' or 'auto', fewer points, or a larger memory_gb",
        )
        K = kernel(X, X, M, memory_gb=self.memory_gb)
        if reg == 0:
            return pseudo_inverse_solve(K, Y)
        factor, status = _add_ridge_and_factor(K, reg)
        if int(status) != 0 and K.dtype == torch.float32:
            logger.info("float32 Cholesky of K + reg·I failed; recomputing K in float64")
            del K, factor
            M64 = None if M is None else M.double()
            K = kernel(X.double(), X.double(), M64, memory_gb=self.memory_gb)
            factor, status = _add_ridge_and_factor(K, reg)
        return _cholesky_solve(K, factor, status, Y, reg)


def _add_ridge_and_factor(K: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K += reg·I in place, then its Cholesky factor and LAPACK status (0: success)."""
    torch.diagonal(K).add_(reg)
    return torch.linalg.cholesky_ex(K)


def _cholesky_solve(
    K: torch.Tensor, factor: torch.Tensor, status: torch.Tensor, Y: torch.Tensor, reg: float
) -> KernelFit:
    """Solve with the factor of K + reg·I (K holds the sum), adding jitter while it fails."""
    diagonal = torch.diagonal(K)
    jitter = 0.0
    scale = float(diagonal.mean()) * torch.finfo(K.dtype).eps
    for attempt in range(_JITTER_ATTEMPTS):
        if int(status) == 0:
            break
        step = scale * 10.0 ** (attempt + 1)
        diagonal += step - jitter
        jitter = step
        factor, status = torch.linalg.cholesky_ex(K)
    if int(status) != 0:
        raise torch.linalg.LinAlgError(
            "the kernel matrix is not positive definite even with a jitter of "
            f"{jitter:.3g}; increase reg or use float64"
        )
    if jitter:
        warnings.warn(
            f"Cholesky of K + reg·I failed; added a jitter of {jitter:.3g} to the diagonal "
            "(increase reg or use float64 to avoid this)",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        logger.warning("direct solve needed a jitter of %.3g", jitter)
    alpha = torch.cholesky_solve(Y.to(K.dtype), factor).to(Y.dtype)
    info = {"jitter": jitter, "factor_dtype": str(K.dtype).removeprefix("torch.")}
    return KernelFit(alpha, Y - (reg + jitter) * alpha, info)


def pseudo_inverse_solve(K: torch.Tensor, Y: torch.Tensor) -> KernelFit:
    """The minimum-norm least-squares solution of K α = Y for a symmetric K (n, n), through
    ``eigh`` with eigenvalues below n·ε of the largest dropped; ``info["rank"]`` is the rank."""
    values, vectors = torch.linalg.eigh(K)
    cutoff = values.abs().max() * K.shape[0] * torch.finfo(K.dtype).eps
    kept = vectors[:, values > cutoff]
    coords = kept.T @ Y
    alpha = kept @ (coords / values[values > cutoff, None])
    return KernelFit(alpha, kept @ coords, {"rank": kept.shape[1]})
