"""EigenPro's preconditioner: the damped top eigensystem of a Nyström subsample kernel.

From a subsample S of s training points: the top eigenpairs (λ_j, e_j) of K_S/s (a dense
solver: iterative ones asked for hundreds of eigenvectors are slow and inaccurate), the damping
D_j = (1 − λ_{q+1}/λ_j)/λ_j, and β(q), the largest diagonal of the damped kernel over the
training set, which sets the batch size and step (Ma & Belkin 2019; docs/eigenpro.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch

from deeprfm._memory import rows_per_block
from deeprfm.kernels import Kernel

__all__ = ["PASS_ROWS", "Preconditioner", "damped_diagonal_max", "top_eigenpairs"]

#: Rows per block of the one pass over the training set at setup (efficient, small memory).
PASS_ROWS = 2048


@dataclass
class Preconditioner:
    """The damped top eigensystem of the subsample kernel and what it implies.

    Attributes
    ----------
    indices : torch.Tensor, shape (s,)
        Rows of the subsample S in the training set.
    E : torch.Tensor, shape (s, q)
        Top-q eigenvectors of K_S/s divided by √s.
    D : torch.Tensor, shape (q,)
        (1 − λ_{q+1}/λ_j)/λ_j.
    top : float
        λ_1, the largest eigenvalue of K_S/s.
    tail : float
        λ_{q+1}, the top eigenvalue after damping.
    """

    indices: torch.Tensor
    E: torch.Tensor
    D: torch.Tensor
    top: float
    tail: float

    @property
    def q(self) -> int:
        return self.D.shape[0]

    def correction(self, K_SB_g: torch.Tensor) -> torch.Tensor:
        """E diag(D) Eᵀ K(X_S, X_B) g (s, c) from K(X_S, X_B) g (s, c)."""
        return self.E @ (self.D[:, None] * (self.E.T @ K_SB_g))


def damped_diagonal_max(
    kernel: Kernel,
    X: torch.Tensor,
    centres: torch.Tensor,
    E: torch.Tensor,
    values: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """β(q) = max_i k_P(x_i, x_i) over the training points for every q = 0, …, k − 1.

    Damping the top q directions to λ_{q+1} gives k_P(x, x) = k(x, x) − Σ_{j≤q} D_j a_j(x)²
    with a_j(x) = K(x, X_S) E_j and D_j = 1/λ_j − λ_{q+1}/λ_j², i.e. two cumulative sums over j
    of a_j²/λ_j and a_j²/λ_j². One pass of K(X, X_S) (blocks of rows) serves every q.

    Parameters
    ----------
    X : torch.Tensor, shape (n, r)
    centres : torch.Tensor, shape (s, r)
    E : torch.Tensor, shape (s, k)
        Top eigenvectors of K_S/s divided by √s.
    values : torch.Tensor, shape (k,)
        Their eigenvalues λ_1 ≥ … ≥ λ_k (float64).
    budget : int
        Bytes. Blocks of rows take at most a quarter for the kernel block (the rest is for the
        (rows, k) sums) and at most ``PASS_ROWS`` rows.

    Returns
    -------
    torch.Tensor, shape (k,), float64
        β(q) for q = 0 … k − 1 (β(0) = max k(x, x)).
    """
    top = kernel.max_diagonal
    betas = torch.zeros_like(values)
    betas[0] = top
    inverse = 1 / values
    row_bytes = 3 * centres.shape[0] * X.element_size()  # a row of the kernel's temporaries
    rows = rows_per_block(budget // 4, row_bytes, min(X.shape[0], PASS_ROWS), minimum=32)
    for _, block in kernel.blocks(X, centres, rows=rows):
        squares = (block @ E).double() ** 2  # (b, k)
        by_value = torch.cumsum(squares * inverse, dim=1)
        by_square = torch.cumsum(squares * inverse**2, dim=1)
        damped = top - by_value[:, :-1] + values[1:] * by_square[:, :-1]  # q = 1 … k − 1
        betas[1:] = torch.maximum(betas[1:], damped.amax(dim=0))
    return betas.clamp(max=top)


def top_eigenpairs(K: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest eigenpairs of a symmetric matrix, in float64, descending.

    CPU: LAPACK's ``syevr`` for the wanted subset only (far faster than a full ``eigh``);
    CUDA: ``torch.linalg.eigh``. Both are dense solvers: iterative ones asked for hundreds of
    eigenvectors are slow and inaccurate.
    """
    s = K.shape[0]
    if K.device.type == "cpu":
        values, vectors = scipy.linalg.eigh(
            K.double().numpy(),
            subset_by_index=(s - count, s - 1),
            driver="evr",
            overwrite_a=True,
            check_finite=False,
        )
        values, vectors = torch.from_numpy(values), torch.from_numpy(vectors)
    else:
        values, vectors = torch.linalg.eigh(K.double())
        values, vectors = values[s - count :], vectors[:, s - count :]
    return values.flip(0).to(K.device), vectors.flip(1).to(K.device)
