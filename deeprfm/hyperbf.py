"""HyperBF networks that learn their metric: by gradient descent, or by AGOP with fixed centres.

``HyperBFRegressor`` and ``HyperBFClassifier`` fit f(x) = Σ_α c_α φ(‖W(x − t_α)‖²) (Poggio &
Girosi 1990) to targets by minimising J = (1/n)(Σ_i ‖f(x_i) − y_i‖² + λ P(c)), with the metric
M = WᵀW learned in one of the two ways Gan & Poggio (CBMM memo 148, 2024) compare:

* ``metric_update="gd"``: c, W (and the centres t with ``moving_centres``) descend J together,
  in shuffled minibatches with Adam or plain SGD. One epoch is one pass over the training set.
* ``metric_update="agop"``: centres fixed; epoch 0 solves J for c in closed form with W₀; every
  later epoch sets M ← normalize(AGOP(f)^p) over the training points, W = M^{1/2} (or its best
  rank-r factor), and solves for c again: an RFM whose centres are the HyperBF's centres.

The mathematics (objective, gradients, solve, AGOP) lives in :mod:`deeprfm._hyperbf_network`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import xarray as xr
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_array, check_is_fitted
from tqdm.auto import tqdm

from deeprfm._classes import TARGET_CODES
from deeprfm._diagnostics import check_outputs, next_metric
from deeprfm._hyperbf_network import (
    OPTIMIZERS,
    PENALTIES,
    Network,
    batch_gradients,
    initial_network,
    metric_factor,
    objective,
    outputs,
    predictor_agop,
    solve_coefficients,
)
from deeprfm._memory import Compute, check_fits, check_memory_gb, resolve_device, resolve_dtype
from deeprfm._records import labelled_record
from deeprfm._targets import SCORE_ATTRS, ClassCodeTargets, RealTargets
from deeprfm._validation import (
    Constraint,
    Flag,
    Number,
    OneOf,
    Rule,
    check_params,
    estimator_inputs,
    eval_set_inputs,
    seeded_generator,
    to_tensor,
)
from deeprfm.agop import NORMALIZATIONS
from deeprfm.kernels import KERNELS, Kernel, make_kernel
from deeprfm.persist import params_json
from deeprfm.rfm import metric_bytes

__all__ = ["HyperBFClassifier", "HyperBFRegressor"]

#: The two ways of learning the metric.
METRIC_UPDATES = ("gd", "agop")
#: ``epochs=None``: passes over the data ("gd") or AGOP updates ("agop").
DEFAULT_EPOCHS = {"gd": 100, "agop": 5}

_HISTORY_ATTRS = SCORE_ATTRS | {
    "train_loss": (
        "training objective",
        "J = (1/n)(sum over training points of |f(x) - y|^2 + reg * P(c)), P the penalty",
    ),
    "train_seconds": (
        "seconds of training",
        "wall-clock seconds of the epoch's updates (gradient steps, or AGOP and solve)",
    ),
    "seconds": ("seconds per epoch", "wall-clock seconds of the whole epoch, scoring included"),
}


@dataclass
class _Settings:
    """The validated parameters a fit needs beyond the estimator's own attributes."""

    kernel: Kernel
    epochs: int


@dataclass(eq=False, repr=False)
class _BaseHyperBF(BaseEstimator):
    """Shared fitting of :class:`HyperBFRegressor` and :class:`HyperBFClassifier`; the
    constructor is generated from the fields, ``_constraints`` is the table of what each
    parameter admits (checked in ``fit``)."""

    kernel: str | Kernel = "gaussian"
    bandwidth: float = 10.0
    exponent: float = 1.0
    n_centres: int | None = 1000
    rank: int | None = None
    metric_update: str = "gd"
    epochs: int | None = None
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    batch_size: int = 128
    moving_centres: bool = True
    reg: float = 1e-3
    penalty: str = "l2"
    agop_power: float = 1.0
    normalize: str | None = "max"
    device: str | torch.device | None = None
    dtype: torch.dtype | str = torch.float32
    memory_gb: float | None = None
    random_state: int | None = None
    verbose: bool = False

    _constraints: ClassVar[dict[str, Constraint]] = {
        "kernel": OneOf(tuple(KERNELS), types=(Kernel,)),
        "bandwidth": Number(low=0, low_inclusive=False),
        "exponent": Number(low=0, low_inclusive=False, high=2),
        "n_centres": Number(integer=True, low=1, optional=True),
        "rank": Number(integer=True, low=1, optional=True),
        "metric_update": OneOf(METRIC_UPDATES),
        "epochs": Number(integer=True, low=0, optional=True),
        "optimizer": OneOf(tuple(OPTIMIZERS)),
        "learning_rate": Number(low=0, low_inclusive=False),
        "batch_size": Number(integer=True, low=1),
        "moving_centres": Flag(),
        "reg": Number(low=0),
        "penalty": OneOf(PENALTIES),
        "agop_power": Number(low=0, low_inclusive=False),
        "normalize": OneOf(NORMALIZATIONS),
        "device": Rule(resolve_device),
        "dtype": Rule(resolve_dtype),
        "memory_gb": Rule(check_memory_gb),
        "verbose": Flag(),
    }

    # -- fitting -------------------------------------------------------------------------

    def _check_params(self, n_features: int) -> _Settings:
        """Every parameter checked against ``_constraints``; the kernel and epochs."""
        check_params(self, self._constraints)
        if self.rank is not None and self.rank > n_features:
            raise ValueError(f"rank must be at most n_features={n_features}, got {self.rank}")
        epochs = DEFAULT_EPOCHS[self.metric_update] if self.epochs is None else self.epochs
        return _Settings(make_kernel(self.kernel, self.bandwidth, self.exponent), epochs)

    def fit(self, X, y, eval_set=None):
        """Train the network.

        Parameters
        ----------
        X : array-like or torch.Tensor, shape (n_samples, n_features)
            Training inputs.
        y : array-like, shape (n_samples,) or (n_samples, n_outputs)
            Labels (classifier) or targets (regressor).
        eval_set : tuple (X_val, y_val), optional
            Validation data, scored after every epoch (``history_``); the last epoch is kept.

        Returns
        -------
        self
        """
        compute = Compute.resolve(self.device, self.dtype, self.memory_gb)
        regressor = isinstance(self, RegressorMixin)
        # the network copies the centres it keeps: X itself is only read
        X, y = estimator_inputs(
            self,
            X,
            y,
            device=compute.device,
            dtype=compute.dtype,
            reset=True,
            y_check={"multi_output": regressor, "y_numeric": regressor},
        )
        settings = self._check_params(X.shape[1])
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
        self._fit_tensors(settings, X, Y, validation, compute)
        return self

    def _check_memory(self, X: torch.Tensor, m: int, compute: Compute) -> None:
        """Refuse (or warn about) the unblocked temporaries of one epoch, before it starts."""
        d, itemsize = X.shape[1], X.element_size()
        rkhs = m * m * itemsize * 5 if self.penalty == "rkhs" and self.reg else 0
        if self.metric_update == "gd":
            needed = 5 * min(self.batch_size, X.shape[0]) * m * itemsize + rkhs
            what = f"a gradient step on batch_size={self.batch_size} points and m={m} centres"
            advice = "use a smaller batch_size, fewer n_centres or a larger memory_gb"
        else:
            needed = 2 * 8 * m * m + metric_bytes(d) + rkhs
            what = f"metric_update='agop' with m={m} centres (two m x m float64 matrices)"
            advice = "use fewer n_centres or a larger memory_gb"
        check_fits(needed, compute.budget, compute.device, what, advice)

    def _fit_tensors(
        self,
        settings: _Settings,
        X: torch.Tensor,
        Y: torch.Tensor,
        validation: tuple[torch.Tensor, torch.Tensor] | None,
        compute: Compute,
    ) -> None:
        """The epochs on validated tensors X (n, d) and targets Y (n, k) on one device."""
        memory_gb = compute.memory_gb  # one budget for every computation of this fit
        generator = seeded_generator(self.random_state)
        # AGOP(f) of f(x) = g(Wx) lies in the row space of W: a random rank-r W₀ would confine
        # every later metric to it, so "agop" starts from W₀ = I and truncates its updates
        start_rank = self.rank if self.metric_update == "gd" else None
        net = initial_network(X, Y.shape[1], self.n_centres, start_rank, generator)
        self._check_memory(X, net.centres.shape[0], compute)
        kernel = settings.kernel
        if self.metric_update == "gd":
            update = self._gradient_epoch(kernel, X, Y, net, generator)
        else:
            update = self._agop_epoch(kernel, X, Y, net, memory_gb)
        rows, fitted = [], None
        progress = tqdm(range(settings.epochs + 1), desc="HyperBF", disable=not self.verbose)
        for epoch in progress:
            start = time.perf_counter()
            try:
                update(epoch, fitted)
                if X.device.type == "cuda":
                    torch.cuda.synchronize(X.device)
                trained = time.perf_counter()
                loss, fitted = objective(kernel, X, Y, net, self.reg, self.penalty, memory_gb)
            except ValueError as error:
                # epoch 0 scored the inputs themselves: a later overflow comes from the descent
                if epoch == 0 or self.metric_update != "gd":
                    raise
                raise self._diverged(epoch, str(error)) from error
            if not np.isfinite(loss):
                raise self._diverged(epoch, f"the objective is {loss}")
            scores = {"train_loss": loss} | self._scores(check_outputs(fitted), Y, "train")
            if validation is not None:
                predicted = outputs(kernel, validation[0], net, memory_gb)
                scores |= self._scores(predicted, validation[1], "eval")
            end = time.perf_counter()
            rows.append(scores | {"train_seconds": trained - start, "seconds": end - start})
            progress.set_postfix(loss=f"{loss:.4g}")
        self.kernel_ = kernel
        self._network = net
        self.centres_ = net.centres.cpu().numpy().astype(np.float64)
        self.coef_ = net.coef.cpu().numpy().astype(np.float64)
        self.W_ = net.W.cpu().numpy().astype(np.float64)
        self.M_ = self.W_.T @ self.W_
        self.history_ = self._history(rows)

    def _diverged(self, epoch: int, detail: str) -> ValueError:
        """The error of a fit whose parameters stopped being finite, with its likely cause."""
        cause = (
            f"gradient descent diverged: lower learning_rate={self.learning_rate:g}"
            if self.metric_update == "gd"
            else "the metric or the coefficients overflowed: check the inputs' scale and reg"
        )
        return ValueError(f"{cause} (epoch {epoch}: {detail})")

    def _gradient_epoch(
        self,
        kernel: Kernel,
        X: torch.Tensor,
        Y: torch.Tensor,
        net: Network,
        generator: torch.Generator,
    ) -> Callable[[int, torch.Tensor | None], None]:
        """One pass over shuffled minibatches, one optimiser step each (epoch 0: none)."""
        parameters = [net.coef, net.W] + ([net.centres] if self.moving_centres else [])
        optimizer = OPTIMIZERS[self.optimizer](parameters, self.learning_rate)
        n = X.shape[0]

        def update(epoch: int, fitted: torch.Tensor | None) -> None:
            if epoch == 0:
                return
            order = torch.randperm(n, generator=generator).to(X.device)
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                _, gradients = batch_gradients(
                    kernel, X[rows], Y[rows], net, self.reg, self.penalty, n
                )
                optimizer.step(
                    [gradients.coef, gradients.W]
                    + ([gradients.centres] if self.moving_centres else [])
                )

        return update

    def _agop_epoch(
        self, kernel: Kernel, X: torch.Tensor, Y: torch.Tensor, net: Network, memory_gb: float
    ) -> Callable[[int, torch.Tensor | None], None]:
        """Epoch 0: solve for c. Later epochs: M ← normalize(AGOP^p), W from M, solve for c."""

        def update(epoch: int, fitted: torch.Tensor | None) -> None:
            if epoch > 0:
                M = next_metric(
                    predictor_agop(kernel, X, net, memory_gb),
                    self.agop_power,
                    self.normalize,
                    kernel=kernel,
                    X=net.centres,
                    M=net.W.T @ net.W,
                    fitted=fitted,
                    reg=self.reg,
                )
                net.W = metric_factor(M, self.rank)
            net.coef = solve_coefficients(kernel, X, Y, net, self.reg, self.penalty, memory_gb)

        return update

    def _history(self, rows: list[dict]) -> xr.Dataset:
        columns = {name: [row[name] for row in rows] for name in rows[0]}
        history = labelled_record(columns, "epoch", range(len(rows)), _HISTORY_ATTRS)
        history.attrs = {
            "estimator": type(self).__name__,
            "metric_update": self.metric_update,
            "params": params_json(self),
        }
        return history

    # -- prediction ----------------------------------------------------------------------

    def _outputs(self, X) -> torch.Tensor:
        """Network outputs (m, k) at new points, as a tensor on the fitted device."""
        check_is_fitted(self, "coef_")
        net = self._network
        Z, _ = estimator_inputs(self, X, device=net.coef.device, dtype=net.coef.dtype, reset=False)
        return check_outputs(outputs(self.kernel_, Z, net, self.memory_gb))


@dataclass(eq=False, repr=False)
class HyperBFRegressor(RegressorMixin, RealTargets, _BaseHyperBF):
    """HyperBF network for regression, its metric learned by gradient descent or AGOP.

    Parameters
    ----------
    kernel : {"gaussian", "laplace", "gen_laplace"} or Kernel, default "gaussian"
        Profile φ of the basis functions: any kernel of the library (its ``from_sq_dist`` and
        ``gradient_weight`` are all the network needs). The Gaussian exp(−s / (2L²)) is the
        HyperBF of the memo; the Laplace kernels are not differentiable at a centre, where the
        gradient takes the subgradient 0.
    bandwidth : float
        L > 0, in the units of the W-weighted inputs.
    exponent : float
        γ in (0, 2] of ``"gen_laplace"``.
    n_centres : int or None, default 1000
        m, the number of centres, initialised on training points drawn without replacement by
        ``random_state``; None, or at least n, takes every training point.
    rank : int or None
        None: W is d × d. r ≤ d: W is r × d (M = WᵀW of rank ≤ r): ``"gd"`` starts from a
        random W₀ (r orthonormal rows scaled by √(d/r)); ``"agop"`` starts from W₀ = I and
        keeps the best rank-r factor of every updated metric (the AGOP of a network with a
        rank-r W lies in W's row space, so a random start would confine it there).
    metric_update : {"gd", "agop"}
        How the metric is learned (see the module docstring and docs/hyperbf.md).
    epochs : int or None
        ``"gd"``: passes over the training set (default 100). ``"agop"``: AGOP updates of the
        metric, each followed by a solve for c (default 5). ``history_`` has epochs + 1 rows:
        row 0 is the network before any update (``"gd"``: c = 0; ``"agop"``: c solved with W₀).
    optimizer : {"adam", "sgd"}
        ``"gd"`` only: ``torch.optim.Adam`` or plain ``torch.optim.SGD``.
    learning_rate : float
        ``"gd"`` only: the optimiser's step size.
    batch_size : int
        ``"gd"`` only: training points per step.
    moving_centres : bool
        ``"gd"`` only: descend on the centres too (``"agop"`` always keeps them fixed).
    reg : float
        λ ≥ 0 of the penalty λ P(c) in J.
    penalty : {"l2", "rkhs"}
        P(c) = ‖c‖²_F (ridge on c), or tr(cᵀ K_TT c), the regularisation network's RKHS norm
        (with the centres at all training points, ``"agop"`` then solves exactly an RFM's
        kernel ridge regression).
    agop_power : float
        ``"agop"`` only: M = AGOP^p.
    normalize : {"max", "trace", "spectral", None}
        ``"agop"`` only: scaling of M before W = M^{1/2}, as in an RFM. With ``"gd"`` the scale
        of W is learned and ``M_`` is not normalised.
    device : str or torch.device, optional
        Default CUDA when available, else the CPU.
    dtype : torch.float32 or torch.float64
    memory_gb : float, optional
        Budget of the blocked computations (evaluation, solve, AGOP).
    random_state : int, optional
        Seed of the centres, a low-rank W₀ and the minibatch order: the same seed gives the same
        model bit for bit on the CPU.
    verbose : bool
        Progress bar over epochs.

    Attributes
    ----------
    centres_ : ndarray, shape (m, n_features)
        The centres t (moved by gradient descent with ``moving_centres``).
    coef_ : ndarray, shape (m, n_outputs)
        The coefficients c.
    W_ : ndarray, shape (r, n_features)
        The metric factor (r = n_features unless ``rank``).
    M_ : ndarray, shape (n_features, n_features)
        The metric WᵀW of the kernel, comparable to an RFM's ``M_``.
    history_ : xarray.Dataset
        Per-epoch ``train_loss`` (J), ``train_mse``, ``eval_mse`` (with ``eval_set``), seconds,
        dim ``epoch``.
    kernel_ : Kernel
    n_features_in_ : int
    """


@dataclass(eq=False, repr=False)
class HyperBFClassifier(ClassifierMixin, ClassCodeTargets, _BaseHyperBF):
    """HyperBF network for classification: regression on class codes, argmax prediction.

    Parameters are those of :class:`HyperBFRegressor`, and:

    targets : {"onehot", "pm1"}, default "onehot"
        Regression codes of the classes: 1 for the class and 0 elsewhere, or +1 and −1 (the
        Deep RFM paper's codes). Labels may be of any type; the prediction is the argmax.

    Attributes
    ----------
    classes_ : ndarray, shape (n_classes,)
        The class labels.
    centres_, coef_, W_, M_, history_, kernel_, n_features_in_
        As in :class:`HyperBFRegressor`; ``history_`` also holds ``train_acc`` and
        ``eval_acc``, and its MSEs are against the ``targets`` codes.
    """

    targets: str = "onehot"

    _constraints: ClassVar[dict[str, Constraint]] = _BaseHyperBF._constraints | {
        "targets": OneOf(TARGET_CODES)
    }
