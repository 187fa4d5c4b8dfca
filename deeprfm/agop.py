"""Average Gradient Outer Product (AGOP) of kernel predictors and of any torch callable.

For the kernel predictor f(z) = K_M(z, X) α (centres X, n×d; coefficients α, n×c) every
kernel of :mod:`deeprfm.kernels` has ∇_z K_M(x_i, z) = w_i(z) · M(x_i − z), hence

    ∇f_c(z_j) = M v_jc,   v_jc = Σ_i W_ij α_ic x_i − (Σ_i W_ij α_ic) z_j,

with W_ij = w(x_i, z_j). For a block of evaluation points and a block of centres both sums are
matrix products, and AGOP = M (Σ_jc v_jc v_jcᵀ / m) M, so the whole computation is blocked
matrix multiplication: no loop over points or classes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal

import torch

from analysis import psd_power
from analysis._common import user_stacklevel
from deeprfm._memory import memory_budget, rows_per_block
from deeprfm._validation import check_number, seeded_generator
from deeprfm.kernels import Kernel, _sq_distances_from, m_sq_norms

__all__ = [
    "DEFAULT_PROJECTIONS",
    "OutputProjections",
    "agop",
    "check_agop_outputs",
    "kernel_agop",
    "normalize_matrix",
    "psd_power",
]

Normalization = Literal["max", "trace", "spectral"] | None
#: The scalings of M that ``normalize`` can name (None: unscaled).
NORMALIZATIONS = ("max", "trace", "spectral", None)
#: Smallest block of evaluation points worth a pass over the centres.
_MIN_POINT_BLOCK = 64
#: Smallest block of centres worth a matrix product.
_MIN_CENTRE_BLOCK = 256


def _block_sizes(budget: int, itemsize: int, m: int, n: int, c: int, d: int) -> tuple[int, int]:
    """Rows of evaluation points and of centres per block of the closed-form AGOP.

    A block of b points against t centres holds the squared distances, kernel values and
    gradient weights (3bt), the class-weighted kernel (bct) and the gradients (2bcd).
    """
    all_centres = itemsize * (n * (3 + c) + 2 * c * d)
    points = rows_per_block(budget, all_centres, m)
    if points >= min(m, _MIN_POINT_BLOCK):
        return points, n
    points = min(m, _MIN_POINT_BLOCK)
    left = max(budget - points * 2 * c * d * itemsize, 0)
    centres = rows_per_block(left, points * (3 + c) * itemsize, n, minimum=_MIN_CENTRE_BLOCK)
    return points, centres


def kernel_agop(
    kernel: Kernel,
    X: torch.Tensor,
    alpha: torch.Tensor,
    M: torch.Tensor | None = None,
    Z: torch.Tensor | None = None,
    *,
    centering: bool = False,
    diag: bool = False,
    memory_gb: float | None = None,
) -> torch.Tensor:
    """AGOP of the kernel predictor f(z) = K_M(z, X) α, in closed form.

    Parameters
    ----------
    kernel : Kernel
        The kernel of the predictor.
    X : torch.Tensor, shape (n, d)
        Centres of the predictor.
    alpha : torch.Tensor, shape (n, c)
        Coefficients of the predictor.
    M : torch.Tensor, shape (d, d), optional
        Metric of the kernel; ``None`` means the identity.
    Z : torch.Tensor, shape (m, d), optional
        Points at which the gradients are averaged; default ``X``.
    centering : bool
        Subtract each output's mean gradient before taking outer products.
    diag : bool
        Return only the diagonal (as a diagonal d×d matrix); cheaper for large d.
    memory_gb : float, optional
        Budget for the blocks; ``None``: a safe fraction of free memory.

    Returns
    -------
    torch.Tensor, shape (d, d)
        (1/m) Σ_j Σ_c ∇f_c(z_j) ∇f_c(z_j)ᵀ (centred if asked), symmetric PSD.
    """
    if alpha.ndim == 1:
        alpha = alpha[:, None]
    Z = X if Z is None else Z
    (n, d), (m, c) = X.shape, (Z.shape[0], alpha.shape[1])
    point_rows, centre_rows = _block_sizes(
        memory_budget(memory_gb, X.device), X.element_size(), m, n, c, d
    )
    shift = X.mean(dim=0)  # distances and v are translation invariant; rounding is not
    X = X - shift
    x_sq = m_sq_norms(X, M)
    grad_sum = torch.zeros(c, d, dtype=X.dtype, device=X.device)
    outer = torch.zeros((d,) if diag else (d, d), dtype=X.dtype, device=X.device)
    for start in range(0, m, point_rows):
        Zb = Z[start : start + point_rows] - shift
        ZM = Zb if M is None else Zb @ M
        z_sq = (ZM * Zb).sum(dim=1)
        v = torch.zeros(Zb.shape[0], c, d, dtype=X.dtype, device=X.device)
        for first in range(0, n, centre_rows):
            centres = slice(first, first + centre_rows)
            # only the (t, b) weights outlive this line: distances and values are freed
            weights = kernel.value_and_weight(
                _sq_distances_from(X[centres], x_sq[centres], ZM, z_sq)
            )[1]
            a = alpha[centres]  # (t, c)
            # written into a contiguous (b, c, t) block: a plain product would take the strides
            # of weights.T, and the reshape below would copy all of it
            per_class = torch.empty(Zb.shape[0], c, a.shape[0], dtype=X.dtype, device=X.device)
            torch.mul(weights.T[:, None, :], a.T[None, :, :], out=per_class)
            v += (per_class.reshape(-1, a.shape[0]) @ X[centres]).view(-1, c, d)
            v -= (weights.T @ a)[:, :, None] * Zb[:, None, :]
        grad_sum += v.sum(dim=0)
        flat = v.reshape(-1, d)
        if diag:
            outer += ((flat if M is None else flat @ M) ** 2).sum(dim=0)
        else:
            outer += flat.T @ flat
    mean_grad = grad_sum / m  # (c, d), before the factor M
    if diag:
        values = outer / m
        if centering:
            values = values - ((mean_grad if M is None else mean_grad @ M) ** 2).sum(dim=0)
        return torch.diag(values.clamp_min(0))
    second = outer / m
    if centering:
        second = second - mean_grad.T @ mean_grad
    result = second if M is None else M @ second @ M
    return (result + result.T) / 2


def normalize_matrix(A: torch.Tensor, method: Normalization = "max") -> torch.Tensor:
    """Scale a PSD matrix: by its largest entry, its trace, its spectral norm, or not at all.

    Parameters
    ----------
    A : torch.Tensor, shape (d, d)
    method : {"max", "trace", "spectral", None}
        ``"max"`` divides by the largest absolute entry (the reference implementations'
        choice, which keeps the meaning of the bandwidth), ``"trace"`` by the trace,
        ``"spectral"`` by the largest eigenvalue.

    Returns
    -------
    torch.Tensor, shape (d, d)
        A new matrix; ``A`` itself if it is zero (with a warning) or ``method`` is None.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {method!r}")
    if method is None:
        return A
    if method == "max":
        scale = A.abs().max()
    elif method == "trace":
        scale = torch.trace(A)
    else:
        scale = torch.linalg.eigvalsh((A + A.T) / 2)[-1]
    if not scale > 0:
        warnings.warn(
            "the matrix to normalise has no positive scale (a zero AGOP: the predictor is "
            "constant); it is left unnormalised",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return A
    return A / scale


#: Random projections of the outputs that ``agop_outputs="random"`` draws per sample.
DEFAULT_PROJECTIONS = 16

AgopOutputs = Literal["exact", "random"] | int


def check_agop_outputs(agop_outputs: AgopOutputs) -> int | None:
    """The number of random output projections ``agop_outputs`` asks for; None for exact.

    ``"exact"``: one cotangent per output (None); ``"random"``: :data:`DEFAULT_PROJECTIONS`;
    an int k ≥ 1: k projections. Anything else raises TypeError/ValueError naming
    ``agop_outputs``.
    """
    if isinstance(agop_outputs, str):
        if agop_outputs == "exact":
            return None
        if agop_outputs == "random":
            return DEFAULT_PROJECTIONS
        raise ValueError(
            f"agop_outputs: expected 'exact', 'random' or a positive int, got {agop_outputs!r}"
        )
    check_number(agop_outputs, "agop_outputs", integer=True, low=1)
    return int(agop_outputs)


#: Samples per chunk of random projections drawn at once (the draws of a sample must not depend
#: on how the samples are batched, and torch's Gaussian sampler draws a tensor as a whole).
_PROJECTION_CHUNK = 64


class OutputProjections:
    """The cotangents of the AGOP's outputs, batch by batch: the one draw policy of the library.

    Exact (``agop_outputs="exact"``): the c unit vectors, the same for every sample. Random
    (an int k, or ``"random"``): for every sample, k independent Gaussian vectors
    v ~ N(0, I/k), so that E[Σ_j Jᵀv_j v_jᵀJ] = JᵀJ (unbiased). Samples take their draws in the
    order they come from one float64 stream on the CPU, seeded by ``random_state`` and drawn in
    chunks of a fixed number of samples: the draws of a sample do not depend on the batch sizes,
    so an estimate depends on ``random_state`` only. Used by :func:`agop` and by
    :class:`~deeprfm.probes.NeuralProbe`.

    Parameters
    ----------
    agop_outputs : "exact", "random" or int
    random_state : int, optional
    """

    def __init__(self, agop_outputs: AgopOutputs = "exact", random_state: int | None = None):
        self.projections = check_agop_outputs(agop_outputs)
        self.generator = seeded_generator(random_state)
        self._drawn = torch.empty(0, 0, 0, dtype=torch.float64)  # (samples, k, c) not yet used

    def cotangents(self, batch: int, outputs: int, like: torch.Tensor) -> torch.Tensor:
        """Cotangents (k, batch, outputs) for the next ``batch`` samples, in ``like``'s dtype
        and on its device (k = outputs when exact)."""
        if self.projections is None:
            eye = torch.eye(outputs, dtype=like.dtype, device=like.device)
            return eye[:, None, :].expand(outputs, batch, outputs)
        chunks = [self._drawn]
        available = self._drawn.shape[0]
        while available < batch:
            shape = (_PROJECTION_CHUNK, self.projections, outputs)
            chunks.append(torch.randn(shape, generator=self.generator, dtype=torch.float64))
            available += _PROJECTION_CHUNK
        drawn = torch.cat([c.reshape(-1, self.projections, outputs) for c in chunks])
        self._drawn = drawn[batch:]
        scaled = drawn[:batch].transpose(0, 1) / math.sqrt(self.projections)
        return scaled.to(dtype=like.dtype, device=like.device)


def agop(
    fn: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    *,
    agop_outputs: AgopOutputs = "exact",
    centering: bool = False,
    batch_size: int = 256,
    random_state: int | None = None,
) -> torch.Tensor:
    """AGOP of any torch callable, by automatic differentiation (``torch.func``).

    Parameters
    ----------
    fn : callable
        Maps a batch (b, ...) to outputs (b, c) or (b,), each output row depending only on
        its own input row (an ``nn.Module`` in eval mode, a kernel predictor, ...).
    X : torch.Tensor, shape (n, ...)
        Points at which the gradients are averaged; the gradient is taken with respect to
        the flattened input, of size D = prod(X.shape[1:]).
    agop_outputs : "exact", "random" or int
        ``"exact"``: one vector-Jacobian product per output. An int k (``"random"``:
        :data:`DEFAULT_PROJECTIONS`): k Gaussian random projections of the outputs per sample,
        drawn as :class:`OutputProjections` says (unbiased, E[Jᵀv vᵀJ] = JᵀJ), for many outputs.
        The same parameter as :class:`~deeprfm.probes.NeuralProbe`'s.
    centering : bool
        Subtract the mean gradient (per output; with random projections, of the projected
        gradients, which estimates the same matrix) first.
    batch_size : int
        Points per vectorised batch.
    random_state : int, optional
        Seed of the random projections.

    Returns
    -------
    torch.Tensor, shape (D, D)
        (1/n) Σ_x J(x)ᵀ J(x), J(x) the (c, D) Jacobian of fn at x.
    """
    projections = OutputProjections(agop_outputs, random_state)
    check_number(batch_size, "batch_size", integer=True, low=1)
    n, D = X.shape[0], X[0].numel()
    grad_sum = outer = None
    for start in range(0, n, batch_size):
        Xb = X[start : start + batch_size]
        out, vjp_fn = torch.func.vjp(lambda inputs: _as_matrix(fn(inputs)), Xb)
        cotangents = projections.cotangents(Xb.shape[0], out.shape[1], out)
        if outer is None:
            grad_sum = torch.zeros(cotangents.shape[0], D, dtype=out.dtype, device=out.device)
            outer = torch.zeros(D, D, dtype=out.dtype, device=out.device)
        (grads,) = torch.func.vmap(vjp_fn)(cotangents)  # (k, b, ...)
        flat = grads.reshape(cotangents.shape[0], Xb.shape[0], D)
        grad_sum += flat.sum(dim=1)
        rows = flat.reshape(-1, D)
        outer += rows.T @ rows
    result = outer / n
    if centering:
        mean = grad_sum / n
        result = result - mean.T @ mean
    return result


def _as_matrix(out: torch.Tensor) -> torch.Tensor:
    if out.ndim == 1:
        return out[:, None]
    if out.ndim != 2:
        raise ValueError(f"fn must return outputs of shape (batch, c) or (batch,), got {out.shape}")
    return out
