"""Average Gradient Outer Product (AGOP) of kernel predictors and of any torch callable.

For the kernel predictor f(z) = K_M(z, X) α (centres X, n×d; coefficients α, n×c) every
kernel of :mod:`deeprfm.kernels` has ∇_z K_M(x_i, z) = w_i(z) · M(x_i − z), hence

    ∇f_c(z_j) = M v_jc,   v_jc = Σ_i W_ij α_ic x_i − (Σ_i W_ij α_ic) z_j,

with W_ij = w(x_i, z_j). For a block of evaluation points and a block of centres both sums are
matrix products, and AGOP = M (Σ_jc v_jc v_jcᵀ / m) M, so the whole computation is blocked
matrix multiplication: no loop over points or classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch

from analysis import psd_power
from analysis._common import user_stacklevel
from deeprfm._memory import memory_budget, rows_per_block
from deeprfm._validation import seeded_generator
from deeprfm.kernels import Kernel, _sq_distances_from, m_sq_norms

__all__ = ["agop", "kernel_agop", "normalize_matrix", "psd_power"]

Normalization = Literal["max", "trace", "spectral"] | None
_NORMALIZATIONS = ("max", "trace", "spectral", None)
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
    if method not in _NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {method!r}")
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


def agop(
    fn: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    *,
    outputs: Literal["exact"] | int = "exact",
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
    outputs : "exact" or int
        ``"exact"``: one vector-Jacobian product per output. An integer k: k Gaussian random
        projections of the outputs (unbiased, E[Jᵀv vᵀJ] = JᵀJ), for many outputs.
    centering : bool
        Subtract the mean gradient (per output, or per projection) first.
    batch_size : int
        Points per vectorised batch.
    random_state : int, optional
        Seed of the random projections.

    Returns
    -------
    torch.Tensor, shape (D, D)
        (1/n) Σ_x J(x)ᵀ J(x), J(x) the (c, D) Jacobian of fn at x.
    """
    if outputs != "exact" and (isinstance(outputs, bool) or not isinstance(outputs, int)):
        raise TypeError(f"outputs must be 'exact' or a positive int, got {outputs!r}")
    if isinstance(outputs, int) and outputs < 1:
        raise ValueError(f"outputs must be a positive number of projections, got {outputs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n, D = X.shape[0], X[0].numel()
    projections: torch.Tensor | None = None
    grad_sum = outer = None
    for start in range(0, n, batch_size):
        Xb = X[start : start + batch_size]
        out, vjp_fn = torch.func.vjp(lambda inputs: _as_matrix(fn(inputs)), Xb)
        if projections is None:
            projections = _output_projections(outputs, out.shape[1], out, random_state)
            grad_sum = torch.zeros(projections.shape[0], D, dtype=out.dtype, device=out.device)
            outer = torch.zeros(D, D, dtype=out.dtype, device=out.device)
        cotangents = projections[:, None, :].expand(-1, Xb.shape[0], -1)
        (grads,) = torch.func.vmap(vjp_fn)(cotangents)  # (k, b, ...)
        flat = grads.reshape(projections.shape[0], Xb.shape[0], D)
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


def _output_projections(
    outputs: Literal["exact"] | int, c: int, like: torch.Tensor, random_state: int | None
) -> torch.Tensor:
    """(k, c) cotangent directions: the identity (exact) or Gaussian vectors scaled by 1/√k."""
    if outputs == "exact":
        return torch.eye(c, dtype=like.dtype, device=like.device)
    generator = seeded_generator(random_state)
    draws = torch.randn(outputs, c, generator=generator, dtype=like.dtype)
    return (draws / outputs**0.5).to(like.device)
