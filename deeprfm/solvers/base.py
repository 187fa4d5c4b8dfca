"""What every kernel ridge-regression solver takes and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from deeprfm.kernels import Kernel


@dataclass
class KernelFit:
    """Result of a kernel ridge regression solve.

    Attributes
    ----------
    alpha : torch.Tensor, shape (n, c)
        Coefficients of the predictor f(z) = K_M(z, X) α.
    fitted : torch.Tensor, shape (n, c)
        The predictor at the training points, K_M(X, X) α.
    info : dict
        Solver diagnostics (e.g. the jitter added, the epochs run).
    """

    alpha: torch.Tensor
    fitted: torch.Tensor
    info: dict = field(default_factory=dict)


class KernelSolver(ABC):
    """Solves (K_M(X, X) + λI) α = Y for the coefficients of a kernel predictor."""

    name: str = ""

    @abstractmethod
    def solve(
        self,
        kernel: Kernel,
        X: torch.Tensor,
        Y: torch.Tensor,
        M: torch.Tensor | None = None,
        reg: float = 0.0,
        eval_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> KernelFit:
        """Fit the coefficients.

        Parameters
        ----------
        kernel : Kernel
        X : torch.Tensor, shape (n, d)
            Training inputs (the centres).
        Y : torch.Tensor, shape (n, c)
            Targets.
        M : torch.Tensor, shape (d, d), optional
            Metric of the kernel; ``None`` means the identity.
        reg : float
            Ridge λ ≥ 0.
        eval_set : (X_val, Y_val), optional
            Validation inputs (m, d) and targets (m, c) for solvers that stop early;
            solvers without early stopping ignore it.
        """
