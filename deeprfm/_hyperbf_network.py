"""The HyperBF network's mathematics: outputs, objective, its gradients, the c-solve, the AGOP.

A HyperBF network (Poggio & Girosi 1990) with centres t_α (m × d), coefficients c (m × k) and
a metric factor W (r × d) is

    f(x) = Σ_α c_α φ(‖W(x − t_α)‖²),        M = WᵀW,

with φ the profile of a :class:`~deeprfm.kernels.Kernel` (``from_sq_dist``; Gaussian
φ(s) = exp(−s / (2L²)) by default). Every distance is taken between projected points
u = Wx and v = Wt, so a rank-r factor costs r, not d, per distance. Its objective is

    J = (1/n) (Σ_i ‖f(x_i) − y_i‖² + λ P(c)),   P(c) = ‖c‖²_F ("l2") or tr(cᵀ K_TT c) ("rkhs"),

with K_TT = φ(‖W(t_α − t_β)‖²) (the regularisation network's norm of f). This module owns
the closed-form gradient of J (checked against ``torch.func`` in tests/test_hyperbf.py), the
closed-form minimiser of J in c for fixed W and t, and the AGOP of f. Derivation: with
s_iα = ‖u_i − v_α‖² and A = ∂J/∂s (any set of points against the centres),

    ∂J/∂W = 2 (Pᵀ X − Qᵀ T),   ∂J/∂x_i = 2 (P W)_i,   ∂J/∂t_α = −2 (Q W)_α,

where P_i = Σ_α A_iα (u_i − v_α) and Q_α = Σ_i A_iα (u_i − v_α), both matrix products; for the
data term A = −½ (G cᵀ) ⊙ w with G = (2/b)(f − y) on a batch of b points and w = −2φ′ the
kernel's gradient weight (``Kernel.gradient_weight``, 0 where φ′ is singular at s = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis import psd_power
from deeprfm._memory import kernel_block_budget, rows_per_block
from deeprfm.agop import kernel_agop
from deeprfm.kernels import Kernel, sq_distances
from deeprfm.solvers.direct import pseudo_inverse_solve

__all__ = [
    "OPTIMIZERS",
    "PENALTIES",
    "SGD",
    "Adam",
    "Network",
    "batch_gradients",
    "initial_network",
    "metric_factor",
    "objective",
    "predictor_agop",
    "solve_coefficients",
]

#: Penalties P(c) of the coefficients: ‖c‖²_F, or the RKHS norm tr(cᵀ K_TT c).
PENALTIES = ("l2", "rkhs")


@dataclass
class Network:
    """The parameters of a HyperBF network (tensors on one device, in one dtype).

    Attributes
    ----------
    centres : torch.Tensor, shape (m, d)
        The centres t_α.
    W : torch.Tensor, shape (r, d)
        The metric factor; the metric is M = WᵀW.
    coef : torch.Tensor, shape (m, k)
        The coefficients c_α of the k outputs.
    """

    centres: torch.Tensor
    W: torch.Tensor
    coef: torch.Tensor

    def projected(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X − μ, XWᵀ − μWᵀ, TWᵀ − μWᵀ) with μ the centres' mean (distances are translation
        invariant; centring keeps the expansion of ‖u − v‖² accurate)."""
        shift = self.centres.mean(dim=0)
        Xs = X - shift
        return Xs, Xs @ self.W.T, (self.centres - shift) @ self.W.T


@dataclass
class Gradients:
    """∂J/∂c (m, k), ∂J/∂t (m, d) and ∂J/∂W (r, d) of a batch."""

    coef: torch.Tensor
    centres: torch.Tensor
    W: torch.Tensor


def initial_network(
    X: torch.Tensor,
    outputs: int,
    n_centres: int | None,
    rank: int | None,
    generator: torch.Generator,
) -> Network:
    """Centres on a subsample of the training points, W = I (or a random rank-r factor), c = 0.

    Parameters
    ----------
    X : torch.Tensor, shape (n, d)
        Training inputs.
    outputs : int
        k, the number of outputs.
    n_centres : int or None
        m; None (or m ≥ n) takes every training point, in order; else m points drawn without
        replacement by ``generator``, kept in their training order.
    rank : int or None
        None: W = I (d × d). r: W = √(d/r) Qᵀ with Q (d × r) orthonormal columns of a Gaussian
        draw, so that E‖Wv‖² = ‖v‖² as for W = I.
    generator : torch.Generator
        CPU generator of every draw.
    """
    n, d = X.shape
    if n_centres is None or n_centres >= n:
        centres = X.clone()
    else:
        chosen = torch.randperm(n, generator=generator)[:n_centres].sort().values
        centres = X[chosen.to(X.device)].clone()
    if rank is None:
        W = torch.eye(d, dtype=X.dtype, device=X.device)
    else:
        draw = torch.randn(d, rank, generator=generator, dtype=torch.float64)
        Q = torch.linalg.qr(draw).Q
        W = ((d / rank) ** 0.5 * Q.T).to(device=X.device, dtype=X.dtype)
    coef = torch.zeros(centres.shape[0], outputs, dtype=X.dtype, device=X.device)
    return Network(centres, W, coef)


def outputs(
    kernel: Kernel, X: torch.Tensor, net: Network, memory_gb: float | None = None
) -> torch.Tensor:
    """f(X) (n, k) in row blocks (``Kernel.apply`` on the projected points; no n × m matrix)."""
    _, U, V = net.projected(X)
    return kernel.apply(U, V, net.coef, memory_gb=memory_gb)


def penalty(kernel: Kernel, net: Network, kind: str, memory_gb: float | None = None) -> float:
    """P(c): ‖c‖²_F (``"l2"``) or tr(cᵀ K_TT c) (``"rkhs"``)."""
    if kind == "l2":
        return float((net.coef**2).sum())
    V = net.projected(net.centres)[2]
    return float((net.coef * kernel.apply(V, V, net.coef, memory_gb=memory_gb)).sum())


def objective(
    kernel: Kernel,
    X: torch.Tensor,
    Y: torch.Tensor,
    net: Network,
    reg: float,
    kind: str,
    memory_gb: float | None = None,
) -> tuple[float, torch.Tensor]:
    """The objective J on all of (X, Y) and the outputs f(X) (n, k) it was computed from."""
    fitted = outputs(kernel, X, net, memory_gb)
    data = float(((fitted - Y) ** 2).sum())
    regulariser = reg * penalty(kernel, net, kind, memory_gb) if reg else 0.0
    return (data + regulariser) / X.shape[0], fitted


def _pair_sums(
    A: torch.Tensor, U: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """P_i = Σ_α A_iα (u_i − v_α) (p, r) and Q_α = Σ_i A_iα (u_i − v_α) (m, r)."""
    return A.sum(dim=1)[:, None] * U - A @ V, A.T @ U - A.sum(dim=0)[:, None] * V


def batch_gradients(
    kernel: Kernel,
    X: torch.Tensor,
    Y: torch.Tensor,
    net: Network,
    reg: float,
    kind: str,
    n: int,
) -> tuple[float, Gradients]:
    """The minibatch objective and its gradients in closed form.

    Parameters
    ----------
    kernel : Kernel
    X : torch.Tensor, shape (b, d)
        A batch of training inputs.
    Y : torch.Tensor, shape (b, k)
        Their targets.
    net : Network
    reg : float
        λ ≥ 0.
    kind : {"l2", "rkhs"}
        The penalty P.
    n : int
        Training points in all; the batch objective (1/b) Σ_batch ‖f − y‖² + (λ/n) P(c) is an
        unbiased estimate of J.

    Returns
    -------
    loss : float
        The batch objective.
    gradients : Gradients
        Its gradients in c, t and W. Memory: a few (b, m) matrices (and (m, m) for "rkhs").
    """
    Xs, U, V = net.projected(X)
    Ts = net.centres - net.centres.mean(dim=0)
    K, weight = kernel.value_and_weight(sq_distances(U, V))
    residual = K @ net.coef - Y
    G = residual * (2.0 / X.shape[0])
    grad_coef = K.T @ G
    A = (G @ net.coef.T).mul_(weight).mul_(-0.5)
    P, Q = _pair_sums(A, U, V)
    grad_W = 2.0 * (P.T @ Xs - Q.T @ Ts)
    grad_centres = -2.0 * Q @ net.W
    loss = float((residual**2).sum()) / X.shape[0]
    if reg:
        scale = reg / n
        if kind == "l2":
            loss += scale * float((net.coef**2).sum())
            grad_coef += (2.0 * scale) * net.coef
        else:
            K_TT, weight_TT = kernel.value_and_weight(sq_distances(V, V))
            KTc = K_TT @ net.coef
            loss += scale * float((net.coef * KTc).sum())
            grad_coef += (2.0 * scale) * KTc
            A_TT = (net.coef @ net.coef.T).mul_(weight_TT).mul_(-0.5 * scale)
            P_TT, Q_TT = _pair_sums(A_TT, V, V)
            grad_W += 2.0 * (P_TT - Q_TT).T @ Ts
            grad_centres += 2.0 * (P_TT - Q_TT) @ net.W
    return loss, Gradients(grad_coef, grad_centres, grad_W)


def solve_coefficients(
    kernel: Kernel,
    X: torch.Tensor,
    Y: torch.Tensor,
    net: Network,
    reg: float,
    kind: str,
    memory_gb: float | None = None,
) -> torch.Tensor:
    """The minimiser of J in c for fixed W and t, with K = K(X, T) (n × m).

    ``"l2"``: (KᵀK + λI) c = KᵀY. ``"rkhs"``: with K_TT = VΛVᵀ (eigenvalues above m·ε·λ_max
    kept), c = VΛ^{-1/2} β and β is the ridge solution of the features Φ = KVΛ^{-1/2}:
    (ΦᵀΦ + λI) β = ΦᵀY, the same minimiser as (KᵀK + λK_TT) c = KᵀY without squaring K_TT's
    condition number. With the centres at the training points, Φ = VΛ^{1/2} and f = Kc is
    kernel ridge regression's (K + λI)⁻¹Y. The Gram matrix of the features is summed over row
    blocks of X (m × m memory, never n × m) in float64 and solved by Cholesky, or by the
    pseudo-inverse when it is singular to working precision (λ = 0).

    Returns
    -------
    torch.Tensor, shape (m, k), in the dtype of X
    """
    _, U, V = net.projected(X)
    m = V.shape[0]
    basis = None
    if reg and kind == "rkhs":
        values, vectors = torch.linalg.eigh(kernel(V, V, memory_gb=memory_gb).double())
        kept = values > values[-1] * m * torch.finfo(torch.float64).eps
        basis = vectors[:, kept] / values[kept].sqrt()
    width = m if basis is None else basis.shape[1]
    gram = torch.zeros(width, width, dtype=torch.float64, device=X.device)
    rhs = torch.zeros(width, Y.shape[1], dtype=torch.float64, device=X.device)
    # a block: the kernel's three temporaries, its float64 copy and the features
    per_row = (3 * X.element_size() + 16) * m
    rows = rows_per_block(kernel_block_budget(memory_gb, X.device), per_row, X.shape[0], 32)
    for block_rows, block in kernel.blocks(U, V, rows=rows):
        features = block.double() if basis is None else block.double() @ basis
        gram.addmm_(features.T, features)
        rhs.addmm_(features.T, Y[block_rows].double())
    torch.diagonal(gram).add_(reg)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs, factor)
    else:
        solution = pseudo_inverse_solve(gram, rhs).alpha
    return (solution if basis is None else basis @ solution).to(X.dtype)


def predictor_agop(
    kernel: Kernel, X: torch.Tensor, net: Network, memory_gb: float | None = None
) -> torch.Tensor:
    """AGOP (d × d) of f over the points X: (1/n) Σ_i Σ_c ∇f_c(x_i) ∇f_c(x_i)ᵀ.

    f(x) = g(Wx) with g(u) = Σ_α c_α φ(‖u − Wt_α‖²), so ∇f = Wᵀ∇g and AGOP(f) = Wᵀ AGOP(g) W:
    the closed-form ``kernel_agop`` of g (centres Wt, evaluation points WX, r × r), then two
    products with W.
    """
    _, U, V = net.projected(X)
    inner = kernel_agop(kernel, V, net.coef, None, U, memory_gb=memory_gb)
    result = net.W.T @ inner @ net.W
    return (result + result.T) / 2


def metric_factor(M: torch.Tensor, rank: int | None) -> torch.Tensor:
    """A factor W with WᵀW = M (rank None: W = M^{1/2}, d × d) or its best rank-r part.

    For rank r, W = Λ_r^{1/2} V_rᵀ (r × d) from the r largest eigenpairs of M (float64
    ``eigh``, negative eigenvalues clamped to 0), so WᵀW is M's best rank-r approximation.
    """
    if rank is None:
        return psd_power(M, 0.5)
    values, vectors = torch.linalg.eigh(M.double())
    top = values[-rank:].flip(0).clamp_min(0.0).sqrt()
    return (top[:, None] * vectors[:, -rank:].flip(1).T).to(M.dtype)


class SGD:
    """Plain gradient descent p ← p − η g on a list of tensors, updated in place."""

    def __init__(self, parameters: list[torch.Tensor], learning_rate: float) -> None:
        self.parameters = parameters
        self.learning_rate = learning_rate

    def step(self, gradients: list[torch.Tensor]) -> None:
        """One step along ``gradients`` (one per parameter, same shapes)."""
        for parameter, gradient in zip(self.parameters, gradients, strict=True):
            parameter.add_(gradient, alpha=-self.learning_rate)


class Adam(SGD):
    """Adam (Kingma & Ba 2015) with ``torch.optim.Adam``'s defaults, on tensors in place.

    m ← β₁m + (1 − β₁)g, v ← β₂v + (1 − β₂)g², p ← p − η (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
    with β = (0.9, 0.999), ε = 1e-8. Written here rather than taken from ``torch.optim``, whose
    first use imports the compiler stack (seconds per process).
    """

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, parameters: list[torch.Tensor], learning_rate: float) -> None:
        super().__init__(parameters, learning_rate)
        self.steps = 0
        self.first = [torch.zeros_like(p) for p in parameters]
        self.second = [torch.zeros_like(p) for p in parameters]

    def step(self, gradients: list[torch.Tensor]) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.learning_rate / (1 - beta1**self.steps)
        root_correction = (1 - beta2**self.steps) ** 0.5
        for parameter, gradient, first, second in zip(
            self.parameters, gradients, self.first, self.second, strict=True
        ):
            first.mul_(beta1).add_(gradient, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            denominator = (second.sqrt() / root_correction).add_(self.eps)
            parameter.addcdiv_(first, denominator, value=-step_size)


#: Optimisers of gradient-descent training, by name.
OPTIMIZERS: dict[str, type[SGD]] = {"adam": Adam, "sgd": SGD}
