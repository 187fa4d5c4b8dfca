"""What every kernel ridge-regression solver takes and returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from deeprfm._validation import check_number, check_symmetric_psd
from deeprfm.kernels import Kernel

__all__ = ["KernelFit", "KernelSolver", "check_eval_set", "check_solve_inputs"]


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


def check_solve_inputs(
    kernel: Kernel,
    X: torch.Tensor,
    Y: torch.Tensor,
    M: torch.Tensor | None,
    reg: float,
    *,
    psd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Validate what :meth:`KernelSolver.solve` takes; every error names the argument.

    Parameters
    ----------
    kernel : Kernel
    X : torch.Tensor, shape (n, d), n ≥ 1
        Finite float32 or float64 training inputs.
    Y : torch.Tensor, shape (n, c)
        Finite targets on X's device (cast to X's dtype).
    M : torch.Tensor, shape (d, d), or None
        Finite symmetric metric on X's device; positive semi-definite (within rounding) unless
        ``psd=False`` (a caller that checks it on the way, as EigenPro's ``eigh`` does).
    reg : float
        Finite ridge λ ≥ 0.

    Returns
    -------
    X, Y (in X's dtype), M, reg (as a float)
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(f"kernel must be a Kernel, got {type(kernel).__name__}")
    for name, tensor in (("X", X), ("Y", Y)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if X.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"X must be a float32 or float64 tensor, got {X.dtype}")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a 2-D tensor (n, d) with n >= 1, got shape {tuple(X.shape)}")
    if Y.ndim != 2:
        raise ValueError(f"Y must be a 2-D tensor (n, c), got shape {tuple(Y.shape)}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"X and Y have different numbers of rows: {X.shape[0]} and {Y.shape[0]}")
    if Y.device != X.device:
        raise ValueError(f"Y is on {Y.device} but X is on {X.device}")
    Y = Y.to(X.dtype)
    for name, tensor in (("X", X), ("Y", Y)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    check_number(reg, "reg", low=0)
    if M is not None:
        _check_metric(M, X, psd)
    return X, Y, M, float(reg)


def _check_metric(M: torch.Tensor, X: torch.Tensor, psd: bool) -> None:
    d = X.shape[1]
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"M must be a torch.Tensor or None, got {type(M).__name__}")
    if M.shape != (d, d):
        raise ValueError(f"M must have shape ({d}, {d}), got {tuple(M.shape)}")
    if M.device != X.device:
        raise ValueError(f"M is on {M.device} but X is on {X.device}")
    if not torch.isfinite(M).all():
        raise ValueError("M contains NaN or infinite values")
    check_symmetric_psd(M, "M", X.dtype if psd else None)


def check_eval_set(
    eval_set: tuple[torch.Tensor, torch.Tensor], X: torch.Tensor, Y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a solver's ``eval_set`` (X_val (m, d), Y_val (m, c)) against X and Y."""
    if not isinstance(eval_set, (tuple, list)) or len(eval_set) != 2:
        raise TypeError("eval_set must be a pair (X_val, Y_val)")
    X_val, Y_val = eval_set
    if not isinstance(X_val, torch.Tensor) or not isinstance(Y_val, torch.Tensor):
        raise TypeError("eval_set must hold two torch tensors")
    if X_val.ndim != 2 or X_val.shape[1] != X.shape[1]:
        raise ValueError(f"eval_set X must have shape (m, {X.shape[1]}), got {tuple(X_val.shape)}")
    if Y_val.shape != (X_val.shape[0], Y.shape[1]):
        raise ValueError(
            f"eval_set Y must have shape ({X_val.shape[0]}, {Y.shape[1]}), got {tuple(Y_val.shape)}"
        )
    if X_val.device != X.device or Y_val.device != X.device:
        raise ValueError(f"eval_set must be on the device of X ({X.device})")
    X_val, Y_val = X_val.to(X.dtype), Y_val.to(X.dtype)
    if not (torch.isfinite(X_val).all() and torch.isfinite(Y_val).all()):
        raise ValueError("eval_set contains NaN or infinite values")
    return X_val, Y_val
