"""Recursive Feature Machines: kernel regression that learns its Mahalanobis metric by AGOP.

M₀ = I (or ``M_init``); for t = 0, 1, …, ``iters``: fit α_t with the kernel K_{M_t}, record
train/validation metrics, and (for t < ``iters``) set M_{t+1} to the normalised power of the
AGOP of the fitted predictor. Iteration 0 is plain kernel regression. With a validation set
and ``early_stopping`` the best iteration is kept, otherwise the last.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import xarray as xr
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted
from tqdm.auto import tqdm

from deeprfm._classes import TARGET_CODES
from deeprfm._diagnostics import check_coefficients, check_outputs, next_metric
from deeprfm._memory import Compute, check_fits, check_memory_gb, resolve_device, resolve_dtype
from deeprfm._records import labelled_record
from deeprfm._targets import SCORE_ATTRS, ClassCodeTargets, RealTargets
from deeprfm._validation import (
    Constraint,
    Flag,
    Number,
    OneOf,
    Rule,
    check_metric_matrix,
    check_params,
    estimator_inputs,
    eval_set_inputs,
    to_tensor,
)
from deeprfm.agop import NORMALIZATIONS, kernel_agop
from deeprfm.kernels import KERNELS, Kernel, make_kernel
from deeprfm.persist import (
    check_tensors,
    jsonable_params,
    load_state,
    model_file_errors,
    params_json,
    restore_params,
    save_state,
)
from deeprfm.solvers import SOLVERS, KernelSolver, make_solver

__all__ = ["RFMClassifier", "RFMRegressor"]

logger = logging.getLogger("deeprfm")

_METRIC_ATTRS = SCORE_ATTRS | {
    "solve_seconds": ("seconds in the kernel solve", "wall-clock seconds to fit alpha"),
    "agop_seconds": ("seconds in the AGOP", "wall-clock seconds to compute the next metric M"),
    "seconds": ("seconds per iteration", "wall-clock seconds of the whole iteration"),
}


@dataclass
class _Candidate:
    """The predictor of one iteration: its metric M, coefficients α and scores."""

    iteration: int
    M: torch.Tensor
    alpha: torch.Tensor
    scores: dict[str, float]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(eq=False, repr=False)
class _BaseRFM(BaseEstimator):
    """Shared fitting loop of :class:`RFMRegressor` and :class:`RFMClassifier`.

    The constructor is generated from the fields below (one signature for both estimators);
    ``_constraints`` is the table of what each parameter admits, checked in ``fit``.
    """

    kernel: str | Kernel = "laplace"
    bandwidth: float = 10.0
    reg: float = 1e-3
    iters: int = 5
    exponent: float = 1.0
    diag: bool = False
    centering: bool = False
    agop_power: float = 1.0
    agop_samples: int = 20000
    normalize: str | None = "max"
    solver: str | KernelSolver = "auto"
    early_stopping: bool = True
    device: str | torch.device | None = None
    dtype: torch.dtype | str = torch.float32
    memory_gb: float | None = None
    random_state: int | None = None
    verbose: bool = False
    copy_X: bool = True

    _constraints: ClassVar[dict[str, Constraint]] = {
        "kernel": OneOf(tuple(KERNELS), types=(Kernel,)),
        "bandwidth": Number(low=0, low_inclusive=False),
        "reg": Number(low=0),
        "iters": Number(integer=True, low=0),
        "exponent": Number(low=0, low_inclusive=False, high=2),
        "diag": Flag(),
        "centering": Flag(),
        "agop_power": Number(low=0, low_inclusive=False),
        "agop_samples": Number(integer=True, low=1),
        "normalize": OneOf(NORMALIZATIONS),
        "solver": OneOf(("auto", *SOLVERS), types=(KernelSolver,)),
        "early_stopping": Flag(),
        "device": Rule(resolve_device),
        "dtype": Rule(resolve_dtype),
        "memory_gb": Rule(check_memory_gb),
        "verbose": Flag(),
        "copy_X": Flag(),
    }

    # -- what classifier and regressor do differently (besides deeprfm._targets) ---------

    def _preference(self, scores: dict[str, float]) -> tuple:
        """Sort key of a candidate on validation scores: larger is better."""
        return (-scores["eval_mse"],)

    # -- fitting -------------------------------------------------------------------------

    def _check_params(self) -> Kernel:
        """Check every parameter against ``_constraints``; the kernel they describe."""
        check_params(self, self._constraints)
        return make_kernel(self.kernel, self.bandwidth, self.exponent)

    def fit(self, X, y, eval_set=None, M_init=None):
        """Fit the RFM.

        Parameters
        ----------
        X : array-like or torch.Tensor, shape (n_samples, n_features)
            Training inputs. A tensor is used where it is (moved to ``device`` in ``dtype`` if
            needed), without a copy through numpy.
        y : array-like, shape (n_samples,) or (n_samples, n_outputs)
            Labels (classifier) or targets (regressor).
        eval_set : tuple (X_val, y_val), optional
            Validation data (X_val an array or tensor), scored at every iteration; with
            ``early_stopping`` the best iteration on it is kept.
        M_init : array-like, shape (n_features, n_features), optional
            Initial metric (e.g. ``M_`` of an earlier fit, to warm-start); default identity.

        Returns
        -------
        self
        """
        kernel = self._check_params()
        compute = Compute.resolve(self.device, self.dtype, self.memory_gb)
        regressor = isinstance(self, RegressorMixin)
        # the model keeps X (its centres): a copy unless copy_X=False
        X, y = estimator_inputs(
            self,
            X,
            y,
            device=compute.device,
            dtype=compute.dtype,
            reset=True,
            copy=self.copy_X,
            y_check={"multi_output": regressor, "y_numeric": regressor},
        )
        if regressor:
            y = check_array(y, ensure_2d=False, input_name="y", dtype=np.float64)
        Y = to_tensor(self._encode_targets(y), compute.device, compute.dtype)
        validation = None
        if eval_set is not None:
            X_val, y_val = eval_set_inputs(
                eval_set, self.n_features_in_, compute.device, compute.dtype
            )
            targets = self._encode_eval_targets(y_val)
            validation = (X_val, to_tensor(targets, compute.device, compute.dtype))
        M0 = None
        if M_init is not None:
            M0 = to_tensor(
                check_metric_matrix(M_init, "M_init", X.shape[1]),
                compute.device,
                compute.dtype,
                copy=True,
            )
        self._fit_tensors(kernel, X, Y, validation, M0, compute)
        return self

    def _fit_tensors(
        self,
        kernel: Kernel,
        X: torch.Tensor,
        Y: torch.Tensor,
        validation: tuple[torch.Tensor, torch.Tensor] | None,
        M_init: torch.Tensor | None,
        compute: Compute,
    ) -> None:
        """The RFM loop on validated tensors (n, d) and targets (n, c) on ``compute.device``."""
        n, d = X.shape
        check_fits(
            metric_bytes(d),
            compute.budget,
            compute.device,
            f"an RFM on d={d} features (its d x d metric, AGOP and eigendecomposition)",
            "use fewer features or a larger memory_gb",
        )
        memory_gb = compute.memory_gb  # one budget for every computation of this fit
        solver = make_solver(
            self.solver,
            n,
            itemsize=X.element_size(),
            device=compute.device,
            memory_gb=memory_gb,
            random_state=self.random_state,
            verbose=self.verbose,
        )
        rng = check_random_state(self.random_state)
        agop_points = X
        if n > self.agop_samples:
            agop_points = X[
                torch.as_tensor(np.sort(rng.choice(n, self.agop_samples, replace=False)))
            ]
        M = torch.eye(d, dtype=X.dtype, device=X.device) if M_init is None else M_init
        rows, candidates = [], []
        for iteration in tqdm(range(self.iters + 1), desc="RFM", disable=not self.verbose):
            start = time.perf_counter()
            fit = solver.solve(kernel, X, Y, M, self.reg, eval_set=validation)
            check_coefficients(fit.alpha, self.reg)
            _synchronize(X.device)
            solved = time.perf_counter()
            scores = self._scores(fit.fitted, Y, "train")
            if validation is not None:
                outputs = kernel.apply(validation[0], X, fit.alpha, M, memory_gb=memory_gb)
                scores |= self._scores(outputs, validation[1], "eval")
            candidates.append(_Candidate(iteration, M, fit.alpha, scores))
            agop_start = time.perf_counter()
            if iteration < self.iters:
                agop = kernel_agop(
                    kernel,
                    X,
                    fit.alpha,
                    M,
                    agop_points,
                    centering=self.centering,
                    diag=self.diag,
                    memory_gb=memory_gb,
                )
                M = next_metric(
                    agop,
                    self.agop_power,
                    self.normalize,
                    kernel=kernel,
                    X=X,
                    M=M,
                    fitted=fit.fitted,
                    reg=self.reg,
                )
                _synchronize(X.device)
            end = time.perf_counter()
            rows.append(
                scores
                | {
                    "solve_seconds": solved - start,
                    "agop_seconds": end - agop_start,
                    "seconds": end - start,
                }
            )
            logger.info("RFM iteration %d: %s", iteration, _format_scores(rows[-1]))
        best = candidates[-1]
        if validation is not None and self.early_stopping:
            best = max(candidates, key=lambda c: (self._preference(c.scores), -c.iteration))
        self.X_fit_ = X
        self.kernel_ = kernel
        self.M_ = best.M.cpu().numpy().astype(np.float64)
        self.alpha_ = best.alpha.cpu().numpy().astype(np.float64)
        self.best_iter_ = best.iteration
        self.history_ = self._history(rows, compute)
        self._M_fit = best.M
        self._alpha_fit = best.alpha

    def _history(self, rows: list[dict], compute: Compute) -> xr.Dataset:
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        history = labelled_record(columns, "iteration", range(len(rows)), _METRIC_ATTRS)
        history.attrs = {
            "estimator": type(self).__name__,
            "best_iteration": int(self.best_iter_),
            "params": params_json(self),
            "device": str(compute.device),
            "memory_budget_gb": compute.memory_gb,
        }
        return history

    # -- prediction ----------------------------------------------------------------------

    def save(self, path) -> None:
        """Save the fitted model: tensors plus a JSON configuration (no pickled code)."""
        check_is_fitted(self, "alpha_")
        config = {
            "kind": type(self).__name__,
            "params": jsonable_params(self),
            "targets": self._target_config(),
            "best_iter": int(self.best_iter_),
            "history": self.history_.to_dict(),
        }
        tensors = {"X_fit": self.X_fit_, "M": self._M_fit, "alpha": self._alpha_fit}
        save_state(path, config, tensors)

    @classmethod
    def load(cls, path, device: str | torch.device | None = None):
        """Load a model written by :meth:`save` (``torch.load(weights_only=True)``).

        Parameters
        ----------
        path : str or Path
        device : str or torch.device, optional
            Where to put the model; default the device it was saved with.
        """
        config, tensors = load_state(path, cls.__name__)
        with model_file_errors(path):
            model = cls(**restore_params(config["params"], device))
            model.kernel_ = model._check_params()
            model._set_target_config(config["targets"])
            check_tensors(
                path,
                tensors,
                {"X_fit": ("n", "d"), "M": ("d", "d"), "alpha": ("n", "c")},
                model._target_sizes(),
            )
            device, dtype = resolve_device(model.device), resolve_dtype(model.dtype)
            model.X_fit_, model._M_fit, model._alpha_fit = (
                tensors[name].to(device=device, dtype=dtype) for name in ("X_fit", "M", "alpha")
            )
            model.n_features_in_ = model.X_fit_.shape[1]
            model.M_ = model._M_fit.cpu().numpy().astype(np.float64)
            model.alpha_ = model._alpha_fit.cpu().numpy().astype(np.float64)
            model.best_iter_ = int(config["best_iter"])
            model.history_ = xr.Dataset.from_dict(config["history"])
        return model

    def _outputs(self, X) -> torch.Tensor:
        """Predictor outputs (m, c) at new points (an array or a tensor), as a tensor on the
        fitted device."""
        check_is_fitted(self, "alpha_")
        Z, _ = estimator_inputs(
            self, X, device=self.X_fit_.device, dtype=self.X_fit_.dtype, reset=False
        )
        return check_outputs(
            self.kernel_.apply(
                Z, self.X_fit_, self._alpha_fit, self._M_fit, memory_gb=self.memory_gb
            )
        )


#: d × d float64 matrices alive at once in an RFM iteration: the AGOP, its eigenvectors and
#: eigenvalue workspace, the power, the metric.
_METRIC_COPIES = 4


def metric_bytes(d: int) -> int:
    """Bytes of the d × d matrices one RFM iteration holds for ``d`` features."""
    return _METRIC_COPIES * 8 * d * d


def _format_scores(row: dict) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in row.items())


@dataclass(eq=False, repr=False)
class RFMRegressor(RegressorMixin, RealTargets, _BaseRFM):
    """Recursive Feature Machine for regression (single or multiple outputs).

    Parameters
    ----------
    kernel : {"laplace", "gaussian", "gen_laplace"} or Kernel
        Kernel of the machine.
    bandwidth : float
        Kernel length scale L > 0.
    reg : float
        Ridge λ ≥ 0 of the kernel regression.
    iters : int
        Number of AGOP updates of the metric (iteration 0 is plain kernel regression).
    exponent : float
        γ in (0, 2] of the generalised Laplace kernel.
    diag : bool
        Keep only the diagonal of the AGOP (a learned per-feature scaling).
    centering : bool
        Subtract the mean gradient before the outer products.
    agop_power : float
        M = AGOP^p (via ``eigh``, negative eigenvalues clamped).
    agop_samples : int
        Evaluation points of the AGOP: a random subsample of the training points of at most
        this size (all centres are always used).
    normalize : {"max", "trace", "spectral", None}
        Scaling of M after each update ("max": divide by the largest entry).
    solver : {"auto", "direct", "eigenpro"} or KernelSolver
        Kernel ridge regression solver; "auto" picks by the memory budget.
    early_stopping : bool
        With ``eval_set``: keep the iteration with the best validation score.
    device : str or torch.device, optional
        Computation device; default CUDA when available, else CPU.
    dtype : torch.float32 or torch.float64
    memory_gb : float, optional
        Memory budget in GiB of the blocked computations (docs/design.md, *The memory-budget
        contract*); default a safe fraction of the free memory, measured once per ``fit``.
    random_state : int, optional
        Seed of the AGOP subsample and of iterative solvers.
    verbose : bool
        Progress bar over iterations.
    copy_X : bool
        Keep a copy of the training inputs as the kernel centres (``X_fit_``). ``False``: a
        tensor ``X`` already on ``device`` in ``dtype`` (or a numpy array torch can share) is
        kept by reference, saving its memory; it must then not be modified while the model is
        used.

    Attributes
    ----------
    M_ : ndarray, shape (n_features, n_features)
        Metric of the kept predictor.
    alpha_ : ndarray, shape (n_samples, n_outputs)
        Coefficients of the kept predictor.
    best_iter_ : int
        Iteration of the kept predictor.
    history_ : xarray.Dataset
        Per-iteration metrics and seconds, dim ``iteration``.
    X_fit_ : torch.Tensor, shape (n_samples, n_features)
        Training inputs (the kernel centres) on the computation device.
    n_features_in_ : int
    """


@dataclass(eq=False, repr=False)
class RFMClassifier(ClassifierMixin, ClassCodeTargets, _BaseRFM):
    """Recursive Feature Machine for classification (kernel regression on class codes).

    Parameters are those of :class:`RFMRegressor`, and:

    targets : {"onehot", "pm1"}, default "onehot"
        Regression codes of the classes: ``"onehot"`` (1 for the class, 0 elsewhere) or
        ``"pm1"`` (+1 and −1, as in the Deep RFM paper). Labels may be of any type (ints,
        strings); the prediction is the argmax of the outputs either way.

    Attributes
    ----------
    classes_ : ndarray, shape (n_classes,)
        The class labels.
    M_, alpha_, best_iter_, history_, X_fit_, n_features_in_
        As in :class:`RFMRegressor`; ``history_`` also holds accuracies. The MSEs of
        ``history_`` are against the ``targets`` codes.
    """

    targets: str = "onehot"

    _constraints: ClassVar[dict[str, Constraint]] = _BaseRFM._constraints | {
        "targets": OneOf(TARGET_CODES)
    }

    def _preference(self, scores: dict[str, float]) -> tuple:
        return (scores["eval_acc"], -scores["eval_mse"])
