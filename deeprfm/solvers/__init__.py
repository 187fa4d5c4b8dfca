"""Kernel ridge-regression solvers behind one interface: direct (Cholesky) and EigenPro."""

from __future__ import annotations

import torch

from deeprfm._memory import memory_budget, resolve_device
from deeprfm._validation import check_number
from deeprfm.solvers.base import KernelFit, KernelSolver
from deeprfm.solvers.direct import DirectSolver
from deeprfm.solvers.eigenpro import EigenProSolver

__all__ = [
    "SOLVERS",
    "DirectSolver",
    "EigenProSolver",
    "KernelFit",
    "KernelSolver",
    "make_solver",
]

SOLVERS: dict[str, type[KernelSolver]] = {"direct": DirectSolver, "eigenpro": EigenProSolver}


def make_solver(
    solver: str | KernelSolver,
    n: int,
    *,
    itemsize: int = 4,
    device: str | torch.device | None = None,
    memory_gb: float | None = None,
    random_state: int | None = None,
    verbose: bool = False,
) -> KernelSolver:
    """Choose a solver by name, or pass a :class:`KernelSolver` instance through.

    Parameters
    ----------
    solver : {"auto", "direct", "eigenpro"} or KernelSolver
        ``"auto"`` takes the direct solve while its two n×n matrices (2·n²·itemsize bytes)
        fit in the memory budget, and EigenPro beyond.
    n : int
        Number of training points.
    itemsize : int
        Bytes per number (4 for float32).
    device : str or torch.device, optional
        Device whose memory bounds the choice; default CUDA when available, else CPU.
    memory_gb : float, optional
        Memory budget; ``None``: a safe fraction of free memory.
    random_state : int, optional
        Seed of EigenPro's subsample and batch order.
    verbose : bool
        EigenPro's progress bar over epochs.
    """
    check_number(n, "n", integer=True, low=1)
    if isinstance(solver, KernelSolver):
        return solver
    names = ("auto", *SOLVERS)
    if solver not in names:
        raise ValueError(f"solver must be one of {names} or a KernelSolver, got {solver!r}")
    if solver == "auto":
        budget = memory_budget(memory_gb, resolve_device(device))
        solver = "direct" if 2 * n * n * itemsize <= budget else "eigenpro"
    if solver == "direct":
        return DirectSolver(memory_gb=memory_gb)
    return EigenProSolver(memory_gb=memory_gb, random_state=random_state, verbose=verbose)
