"""EigenPro 2: preconditioned stochastic gradient descent for kernel ridge regression.

Ma & Belkin, "Kernel machines that adapt to GPUs for effective large batch training" (2019).
The solver fits f = K(·, X) α to (K + λI) α = Y without ever forming K = K_M(X, X): a batch
B of m training points costs one m×n kernel block, computed on the fly, so memory is
O(n·(d + c) + m·n + s²) and an epoch costs about one n×n×d kernel evaluation.

Setup, once per solve:

1. A uniform Nyström subsample S of s training points and the top eigenpairs
   (λ_1 ≥ λ_2 ≥ …, orthonormal V) of K(X_S, X_S)/s by a dense symmetric eigensolver;
   E = V/√s.
2. Damping the top q directions to λ_{q+1}, D_j = (1 − λ_{q+1}/λ_j)/λ_j for j ≤ q, makes the
   iteration below exactly stochastic gradient descent with the preconditioned kernel
   k_P(x, z) = k(x, z) − K(x, X_S) E diag(D) Eᵀ K(X_S, z), whose top eigenvalue (of the
   integral operator) is ≈ λ_{q+1} instead of λ_1.
3. β(q) = max_i k_P(x_i, x_i) over all training points, for every candidate q at once (one
   pass of K(X, X_S)); β(0) = max k(x, x). With ridge, β = β(q) + λ and λ_{q+1} + λ/n.
4. The critical batch size m* = β/λ_{q+1} + 1. Unless given, q is the largest with m* ≤ s:
   below λ ≈ β/s the subsample does not resolve the spectrum, and damping deeper than the
   batch needs still pays because β(q) falls with q.
5. The batch m = min((m* + 1)/2, the rows of one kernel block within the memory budget) and
   the step size η = m/β if m < m* else 2m/(β + (m − 1)λ_{q+1}), times a safety factor.
   Below m* an epoch makes the same progress whatever m (η/m = 1/β); half of m* keeps a
   factor-2 margin on the estimate λ_{q+1} of the preconditioned top eigenvalue.

Iteration on a batch B (a random permutation split into batches, each point once per epoch):
g = K(X_B, X) α − Y_B + λ α_B; α_B ← α_B − (η/m) g;
α_S ← α_S + (η/m) E diag(D) Eᵀ K(X_S, X_B) g, where K(X_S, X_B) are columns of the batch's
block K(X_B, X) (S ⊂ X). The batches are the row blocks of one kernel evaluation
K(X[permutation], X) per epoch.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from analysis._common import user_stacklevel
from deeprfm._memory import memory_budget, rows_per_block
from deeprfm._records import labelled_record
from deeprfm._validation import check_bool, check_number, seeded_generator
from deeprfm.kernels import Kernel
from deeprfm.solvers.base import KernelFit, KernelSolver, check_eval_set, check_solve_inputs
from deeprfm.solvers.preconditioner import Preconditioner, damped_diagonal_max, top_eigenpairs

__all__ = ["EigenProSolver"]

logger = logging.getLogger("deeprfm")

#: Epochs when ``epochs`` is None.
_DEFAULT_EPOCHS = 20
#: Fraction of the step size m/β (or 2m/(β + (m − 1)λ)) that is taken.
_SAFETY = 0.9
#: Smallest automatic batch: smaller matrix products waste the hardware.
_MIN_BATCH = 64
#: Largest number of eigenpairs computed when q is chosen automatically.
_MAX_EIGENPAIRS = 1000
#: Eigenvalues of K_S/s are used down to this many times their rounding error, 2·eps·β₀/√s.
_ROUNDING_MARGIN = 1000
#: Subsample size bounds of the default rule s = n/10.
_SUBSAMPLE_RANGE = (2000, 12000)
#: Below this subsample size (or n) the preconditioner is too poor to solve: refused.
_MIN_SUBSAMPLE = 256
#: A validation MSE this much (relative) below the best so far resets ``patience``.
_MIN_IMPROVEMENT = 1e-3
#: An epoch whose training residual exceeds this multiple of the best one so far diverged.
_DIVERGENCE_FACTOR = 2.0
#: Halvings of the step size tried on divergence before giving up.
_MAX_HALVINGS = 30
#: The eigensolver works on about this many s×s float64 arrays (memory estimate).
_EIGH_COPIES = 3

_HISTORY_ATTRS = {
    "train_residual": (
        "relative training residual",
        "||(K + reg I) alpha - Y||_F / ||Y||_F, each point's residual taken when its batch was "
        "visited during the epoch",
    ),
    "eval_mse": (
        "eval_set mean squared error",
        "mean over eval_set points and outputs of (f(x) - y)^2 after the epoch",
    ),
    "seconds": ("seconds per epoch", "wall-clock seconds of the epoch, validation included"),
}


class EigenProSolver(KernelSolver):
    """Kernel ridge regression by EigenPro 2 iteration: no n×n matrix, no learning rate.

    Preconditioned mini-batch SGD on (K + λI) α = Y (see the module notes). Batch size, step
    size and the number q of damped eigendirections follow from the spectrum of a Nyström
    subsample and the memory budget. Without ridge (λ = 0) the number of epochs is the
    regulariser (early stopping). Runs on the device of ``X`` (CPU or CUDA).

    Parameters
    ----------
    epochs : int, optional
        Maximum number of passes over the data; default 20.
    subsample_size : int, optional
        Nyström subsample size s; default n/10 clipped to [2 000, 12 000] (and to what the
        memory budget allows for the eigensolver); a value above n is clamped to n with a
        warning.
    top_q : int, optional
        Number q < s of damped eigendirections (0: plain SGD); default the largest q
        (at most 999) whose critical batch size m* is at most s.
    batch_size : int, optional
        Batch size m; default (m* + 1)/2 with m* the critical batch size, capped by the rows
        of one kernel block within the memory budget, at least 64. A batch above m* gets the
        smaller step 2m/(β + (m − 1)λ_{q+1}); one above the memory cap is reduced to it with
        a warning.
    tol : float, optional
        Stop once the relative training residual ‖(K + λI)α − Y‖/‖Y‖ of an epoch is ≤ tol.
    patience : int
        With ``eval_set``: stop after this many epochs in a row that do not lower the best
        validation MSE by 0.1 %. The epoch with the lowest validation MSE is returned.
    exact_fitted : bool
        Compute ``KernelFit.fitted`` = K α exactly after training (one more kernel pass,
        about the cost of an epoch). By default ``fitted`` holds the predictions tracked
        during the returned epoch: K(x_i, X) α taken when x_i's batch was visited, so it
        misses the updates made later in that epoch (they are small near convergence).
    memory_gb : float, optional
        Memory budget: bounds the automatic batch (one (m, n) kernel block), every block
        computed and the default subsample size; default a safe fraction of free memory.
    random_state : int, optional
        Seed of the subsample and of the batch order.
    verbose : bool
        Progress bar over epochs showing the training residual and validation MSE.
    """

    name = "eigenpro"

    def __init__(
        self,
        *,
        epochs: int | None = None,
        subsample_size: int | None = None,
        top_q: int | None = None,
        batch_size: int | None = None,
        tol: float | None = None,
        patience: int = 2,
        exact_fitted: bool = False,
        memory_gb: float | None = None,
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        optional_integers = (
            ("epochs", epochs, 1),
            ("subsample_size", subsample_size, 1),
            ("top_q", top_q, 0),
            ("batch_size", batch_size, 1),
            ("random_state", random_state, 0),
        )
        for name, value, low in optional_integers:
            if value is not None:
                check_number(value, name, integer=True, low=low)
        check_number(patience, "patience", integer=True, low=1)
        for name, value in (("tol", tol), ("memory_gb", memory_gb)):
            if value is not None:
                check_number(value, name, low=0, low_inclusive=False)
        check_bool(exact_fitted, "exact_fitted")
        check_bool(verbose, "verbose")
        self.epochs = _DEFAULT_EPOCHS if epochs is None else epochs
        self.subsample_size = subsample_size
        self.top_q = top_q
        self.batch_size = batch_size
        self.tol = tol
        self.patience = patience
        self.exact_fitted = exact_fitted
        self.memory_gb = memory_gb
        self.random_state = random_state
        self.verbose = verbose

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"EigenProSolver({params})"

    def solve(
        self,
        kernel: Kernel,
        X: torch.Tensor,
        Y: torch.Tensor,
        M: torch.Tensor | None = None,
        reg: float = 0.0,
        eval_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> KernelFit:
        """Fit α for (K_M(X, X) + λI) α = Y by EigenPro iteration.

        Parameters
        ----------
        kernel : Kernel
        X : torch.Tensor, shape (n, d)
            Training inputs; the computation runs on their device and dtype.
        Y : torch.Tensor, shape (n, c)
            Targets.
        M : torch.Tensor, shape (d, d), optional
            Symmetric PSD metric of the kernel; ``None`` means the identity.
        reg : float
            Ridge λ ≥ 0.
        eval_set : (X_val, Y_val), optional
            Validation inputs (m, d) and targets (m, c): their MSE is recorded every epoch,
            the best epoch is returned and ``patience`` stops the iteration.

        Returns
        -------
        KernelFit
            ``alpha`` (n, c), ``fitted`` (n, c) and ``info``: ``history`` (xarray.Dataset over
            ``epoch``: ``train_residual``, ``eval_mse`` with ``eval_set``, ``seconds``),
            ``epochs`` run, ``best_epoch``, ``stop_reason`` ("epochs", "tol", "patience"),
            ``train_residual`` (final, exact when ``exact_fitted``), ``subsample_size``,
            ``top_q``, ``batch_size``, ``critical_batch_size``, ``step_size`` (η),
            ``beta``, ``top_eigenvalue``, ``tail_eigenvalue``, ``step_halvings``,
            ``setup_seconds``.
        """
        X, Y, M, reg = check_solve_inputs(kernel, X, Y, M, reg, psd=False)
        factor = _metric_factor(M, X)
        validation = None
        if eval_set is not None:
            X_val, Y_val = check_eval_set(eval_set, X, Y)
            validation = (_transform(X_val, factor), Y_val)
        X = _transform(X, factor)
        generator = seeded_generator(self.random_state)

        start = time.perf_counter()
        n, budget = X.shape[0], memory_budget(self.memory_gb, X.device)
        pre, beta = self._preconditioner(kernel, X, generator, budget)
        beta += reg
        tail = pre.tail + reg / n
        row_bytes = 3 * n * X.element_size()  # a row of an (m, n) kernel block, temporaries
        batch = _batch_size(beta, tail, rows_per_block(budget, row_bytes, n), self.batch_size, n)
        eta = _step_size(beta, tail, batch)
        setup_seconds = time.perf_counter() - start
        logger.info(
            "EigenPro setup in %.1fs: s=%d, q=%d, batch=%d (critical %.0f), eta=%.3g, "
            "beta=%.3g, lambda_1=%.3g, lambda_q+1=%.3g",
            setup_seconds,
            pre.indices.shape[0],
            pre.q,
            batch,
            beta / tail + 1,
            eta,
            beta,
            pre.top,
            pre.tail,
        )
        block_gb = batch * row_bytes / 1024**3  # later products: one batch's block at a time
        run = _Run(kernel, X, Y, reg, pre, (beta, tail), batch, generator, block_gb)
        history, best_epoch, stop_reason = run.iterate(
            validation, self.epochs, self.tol, self.patience, self.verbose
        )
        alpha, fitted = run.best_alpha, run.best_fitted
        residual = float(history["train_residual"][best_epoch - 1])
        if self.exact_fitted:
            fitted = kernel.apply(X, X, alpha, memory_gb=block_gb)
            residual = float(
                torch.linalg.vector_norm(fitted + reg * alpha - Y) / torch.linalg.vector_norm(Y)
            )
        info = {
            "history": history,
            "epochs": history.sizes["epoch"],
            "best_epoch": best_epoch,
            "stop_reason": stop_reason,
            "train_residual": residual,
            "subsample_size": pre.indices.shape[0],
            "top_q": pre.q,
            "batch_size": batch,
            "critical_batch_size": beta / tail + 1,
            "step_size": run.scale * eta,
            "beta": beta,
            "top_eigenvalue": pre.top,
            "tail_eigenvalue": pre.tail,
            "step_halvings": run.halvings,
            "setup_seconds": setup_seconds,
        }
        return KernelFit(alpha, fitted, info)

    # -- setup ---------------------------------------------------------------------------

    def _subsample_size(self, n: int, budget: int) -> int:
        if self.subsample_size is None:
            low, high = _SUBSAMPLE_RANGE
            affordable = math.isqrt(budget // (_EIGH_COPIES * 8))
            if affordable < min(_MIN_SUBSAMPLE, n):
                least = _EIGH_COPIES * 8 * min(_MIN_SUBSAMPLE, n) ** 2
                raise ValueError(
                    f"memory_gb: a budget of {budget / 1024**3:.3g} GiB is too small for "
                    f"EigenPro at n={n}: its preconditioner needs a subsample of at least "
                    f"{min(_MIN_SUBSAMPLE, n)} points, {least / 1024**2:.1f} MiB; raise "
                    "memory_gb"
                )
            if affordable < min(low, n):
                warnings.warn(
                    f"memory_gb: the budget of {budget / 1024**3:.3g} GiB affords a "
                    f"preconditioner subsample of {affordable} points instead of {min(low, n)}; "
                    "EigenPro will need more epochs (raise memory_gb to avoid this)",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            return min(n, max(min(n // 10, high, affordable), min(low, affordable)))
        if self.subsample_size > n:
            warnings.warn(
                f"subsample_size={self.subsample_size} is larger than the number of training "
                f"points {n}; using {n}",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            return n
        return self.subsample_size

    def _preconditioner(
        self, kernel: Kernel, X: torch.Tensor, generator: torch.Generator, budget: int
    ) -> tuple[Preconditioner, float]:
        """The damped eigensystem of a Nyström subsample and β = max k_P(x, x) (without λ)."""
        n = X.shape[0]
        s = self._subsample_size(n, budget)
        if self.top_q is not None and self.top_q >= s:
            raise ValueError(f"top_q must be smaller than the subsample size {s}, got {self.top_q}")
        indices = torch.randperm(n, generator=generator)[:s].to(X.device)
        centres = X[indices]
        K_S = kernel(centres, centres, memory_gb=self.memory_gb)
        wanted = min(s, _MAX_EIGENPAIRS) if self.top_q is None else self.top_q + 1
        values, vectors = top_eigenpairs(K_S, wanted)
        del K_S
        values /= s
        # D_j ≈ 1/λ_j amplifies the rounding error of λ_j: small eigenvalues are not used.
        rounding = 2 * torch.finfo(X.dtype).eps * kernel.max_diagonal / math.sqrt(s)
        usable = int((values > _ROUNDING_MARGIN * rounding).sum())
        values, E = values[:usable], (vectors[:, :usable] / math.sqrt(s)).to(X)
        betas = damped_diagonal_max(kernel, X, centres, E, values, budget)
        if self.top_q is None:
            # Below λ ≈ β/s the subsample cannot resolve the spectrum: m* ≤ s.
            fits = (betas[1:] / values[1:] + 1 <= s).nonzero()
            q = int(fits[-1]) + 1 if fits.numel() else 0
        else:
            q = min(self.top_q, usable - 1)
            if q < self.top_q:
                warnings.warn(
                    f"top_q={self.top_q} reaches eigenvalues at the rounding level of the "
                    f"subsample kernel; using top_q={q}",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
        head, tail = values[:q], float(values[q])
        pre = Preconditioner(
            indices=indices,
            E=E[:, :q],
            D=((1 - tail / head) / head).to(X),
            top=float(values[0]),
            tail=tail,
        )
        return pre, float(betas[q])


class _Run:
    """The epoch loop of one solve: the iterate, stopping, and the divergence guard."""

    def __init__(
        self,
        kernel: Kernel,
        X: torch.Tensor,
        Y: torch.Tensor,
        reg: float,
        pre: Preconditioner,
        spectrum: tuple[float, float],
        batch: int,
        generator: torch.Generator,
        memory_gb: float,
    ) -> None:
        self.kernel, self.X, self.Y, self.reg, self.pre = kernel, X, Y, reg, pre
        self.spectrum, self.batch = spectrum, batch
        self.generator, self.memory_gb = generator, memory_gb
        self.scale = 1.0  # halved on divergence
        self.alpha = torch.zeros_like(Y)
        self.fitted = torch.zeros_like(Y)
        self.best_alpha, self.best_fitted = self.alpha, self.fitted
        self.halvings = 0
        self.y_norm = float(torch.linalg.vector_norm(Y)) or 1.0  # Y = 0: α stays 0

    def iterate(
        self,
        validation: tuple[torch.Tensor, torch.Tensor] | None,
        epochs: int,
        tol: float | None,
        patience: int,
        verbose: bool,
    ) -> tuple[xr.Dataset, int, str]:
        """Run up to ``epochs`` epochs; returns (history, best epoch, stop reason)."""
        records: dict[str, list[float]] = {"train_residual": [], "seconds": []}
        if validation is not None:
            records["eval_mse"] = []
        best_residual, best_val, reference, best_epoch, stale = 1.0, math.inf, math.inf, 0, 0
        stop_reason = "epochs"
        bar = tqdm(range(1, epochs + 1), desc="EigenPro", disable=not verbose)
        for epoch in bar:
            start = time.perf_counter()
            residual = self._stable_epoch(best_residual)
            best_residual = min(best_residual, residual)
            records["train_residual"].append(residual)
            postfix = {"residual": f"{residual:.3g}"}
            if validation is None:
                best_epoch, self.best_alpha, self.best_fitted = epoch, self.alpha, self.fitted
            else:
                predicted = self.kernel.apply(
                    validation[0], self.X, self.alpha, memory_gb=self.memory_gb
                )
                eval_mse = float(((predicted - validation[1]) ** 2).mean())
                records["eval_mse"].append(eval_mse)
                postfix["eval_mse"] = f"{eval_mse:.4g}"
                if eval_mse < best_val:
                    best_val, best_epoch = eval_mse, epoch
                    self.best_alpha, self.best_fitted = self.alpha.clone(), self.fitted.clone()
                if eval_mse < (1 - _MIN_IMPROVEMENT) * reference:
                    reference, stale = eval_mse, 0
                else:
                    stale += 1
            records["seconds"].append(time.perf_counter() - start)
            bar.set_postfix(postfix)
            logger.debug("EigenPro epoch %d: %s", epoch, postfix)
            if tol is not None and residual <= tol:
                stop_reason = "tol"
                break
            if stale >= patience:
                stop_reason = "patience"
                break
        bar.close()
        return _history(records), best_epoch, stop_reason

    def _stable_epoch(self, best_residual: float) -> float:
        """One epoch; on divergence restore α, halve the step and repeat the epoch.

        Divergence: a residual above twice the best so far, or twice √eps when the best is at
        the rounding level (where it fluctuates).
        """
        floor = math.sqrt(torch.finfo(self.X.dtype).eps)
        while True:
            saved = self.alpha.clone()
            residual = self._epoch()
            if residual <= _DIVERGENCE_FACTOR * max(best_residual, floor):  # False for NaN
                return residual
            if self.halvings == _MAX_HALVINGS:
                raise RuntimeError(
                    f"EigenPro diverged even after {_MAX_HALVINGS} halvings of the step size "
                    f"(training residual {residual:.3g}); check the kernel for non-finite values"
                )
            self.halvings += 1
            self.scale /= 2
            self.alpha = saved
            warnings.warn(
                f"EigenPro training residual grew to {residual:.3g}; repeating the epoch with "
                "half the step size",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            logger.warning("EigenPro step size halved (residual %.3g)", residual)

    def _epoch(self) -> float:
        """One pass over a random permutation in batches; returns the relative residual.

        The batches are the row blocks of one kernel evaluation K(X[order], X) (blocks of m
        rows), computed lazily, each after the previous update: the
        centres' norms are computed once per epoch, not once per batch.
        """
        X, pre = self.X, self.pre
        order = torch.randperm(X.shape[0], generator=self.generator).to(X.device)
        total = torch.zeros((), dtype=X.dtype, device=X.device)
        for rows, block in self.kernel.blocks(X[order], X, rows=self.batch):
            idx = order[rows]
            predicted = block @ self.alpha
            self.fitted[idx] = predicted
            g = predicted - self.Y[idx]
            if self.reg:
                g += self.reg * self.alpha[idx]
            total += (g**2).sum()
            step = self.scale * _step_size(*self.spectrum, idx.shape[0]) / idx.shape[0]
            self.alpha.index_add_(0, idx, g, alpha=-step)
            if pre.q:  # S ⊂ X: K(X_S, X_B) is a set of columns of the block, no extra kernel
                correction = pre.correction(block[:, pre.indices].T @ g)
                self.alpha.index_add_(0, pre.indices, correction, alpha=step)
        return math.sqrt(float(total)) / self.y_norm


def _batch_size(beta: float, tail: float, cap: int, batch_size: int | None, n: int) -> int:
    """The batch m: (m* + 1)/2 with m* = β/λ_tail + 1 unless given, within [_MIN_BATCH, cap].

    Below m* the progress per epoch, set by η/m = 1/β, does not depend on m, while stability
    needs (η/m)(β + (m − 1)λ_true) < 2: half of m* tolerates a true preconditioned top
    eigenvalue up to twice the estimate λ_tail. ``cap`` is the rows of one (m, n) kernel block
    within the memory budget; a larger ``batch_size`` is reduced to it with a warning.
    """
    if batch_size is None:
        return min(max(int(min((beta / tail + 2) / 2, cap)), _MIN_BATCH), n)
    if batch_size > cap:
        warnings.warn(
            f"batch_size={batch_size} exceeds the {cap} rows of one kernel block within the "
            f"memory budget; using {cap}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return min(batch_size, cap, n)


def _step_size(beta: float, tail: float, m: int) -> float:
    """η(m) = m/β below m* = β/λ_tail + 1, 2m/(β + (m − 1)λ_tail) from m* on, times the safety
    factor (Ma & Belkin 2019); the two rules meet at m*."""
    critical = beta / tail + 1
    eta = m / beta if m < critical else 2 * m / (beta + (m - 1) * tail)
    return _SAFETY * eta


def _history(records: dict[str, list[float]]) -> xr.Dataset:
    epochs = np.arange(1, len(records["seconds"]) + 1)
    return labelled_record(records, "epoch", epochs, _HISTORY_ATTRS)


def _metric_factor(M: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor | None:
    """F (d, r) with F Fᵀ = M and r = rank M, so that ‖x − z‖_M = ‖(x − z) F‖.

    Transforming the data once saves the d×d product that every kernel call with M would
    repeat on all n rows, and a low-rank M shrinks the kernel products from d to r columns.
    """
    if M is None:
        return None
    d = X.shape[1]
    M = M.double()
    values, vectors = torch.linalg.eigh((M + M.T) / 2)
    tolerance = math.sqrt(torch.finfo(X.dtype).eps) * max(float(values[-1]), 0.0)
    if float(values[0]) < -tolerance:
        raise ValueError(
            f"M must be positive semi-definite, but has eigenvalue {float(values[0]):.3g}"
        )
    kept = values > d * torch.finfo(X.dtype).eps * float(values[-1])
    return (vectors[:, kept] * values[kept].sqrt()).to(X.dtype)


def _transform(X: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return X if factor is None else X @ factor
