"""Mahalanobis kernels K_M(x, z) = φ(‖x − z‖²_M) and what their input gradients need.

Every kernel here is radial in the Mahalanobis distance ‖x − z‖_M = sqrt((x − z)ᵀ M (x − z)).
Its gradient in the evaluation point is

    ∇_z K_M(x, z) = w(x, z) · M (x − z),        w = −2 φ'(‖x − z‖²_M),

so a kernel only has to say how to turn squared distances into kernel values (``from_sq_dist``)
and kernel values into the weight ``w`` (``gradient_weight``); the AGOP and the solvers never
branch on kernel names. Squared distances are computed as xᵀMx + zᵀMz − 2 xᵀMz with matrix
products, clamped at 0, in row blocks that respect a memory budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from deeprfm._memory import kernel_block_budget, rows_per_block
from deeprfm._validation import check_number

__all__ = [
    "KERNELS",
    "GaussianKernel",
    "GeneralizedLaplaceKernel",
    "Kernel",
    "LaplaceKernel",
    "make_kernel",
    "sq_distances",
]

#: Squared distances below this many machine epsilons of ‖x‖²_M + ‖z‖²_M are rounding noise
#: of the expansion xᵀMx + zᵀMz − 2xᵀMz and are set to exactly 0.
_CANCELLATION_EPS = 64


def m_sq_norms(X: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """Squared Mahalanobis norms ‖x_i‖²_M of the rows of ``X`` (n×d) → (n,)."""
    XM = X if M is None else X @ M
    return (XM * X).sum(dim=1)


def check_sq_norms(sq_norms: torch.Tensor) -> None:
    """Raise ValueError if squared distances built from these squared norms could overflow.

    ‖x − z‖²_M ≤ 2‖x‖²_M + 2‖z‖²_M, so norms below a quarter of the dtype's largest value
    keep every distance of the expansion finite; NaN norms fail too.
    """
    if sq_norms.numel() == 0:
        return
    largest = float(sq_norms.max())
    limit = torch.finfo(sq_norms.dtype).max / 4
    if not largest <= limit:
        dtype = str(sq_norms.dtype).removeprefix("torch.")
        raise ValueError(
            f"X: the squared Mahalanobis distances overflow {dtype}: the inputs (centred) have "
            f"squared norms up to {largest:.3g} > {limit:.3g}; rescale the inputs (e.g. "
            "StandardScaler) or use dtype=torch.float64"
        )


def _sq_distances_from(
    X: torch.Tensor, x_sq: torch.Tensor, ZM: torch.Tensor, z_sq: torch.Tensor
) -> torch.Tensor:
    """‖x_i − z_j‖²_M (n×m) given X, ‖x‖²_M, Z M and ‖z‖²_M; rounding noise set to 0.

    Raises ValueError when the squared norms could make the distances overflow
    (:func:`check_sq_norms`): every distance of the library is computed here.
    """
    check_sq_norms(x_sq)
    check_sq_norms(z_sq)
    scale = x_sq[:, None] + z_sq[None, :]
    sq = torch.addmm(scale, X, ZM.T, alpha=-2.0)
    scale.mul_(_CANCELLATION_EPS * torch.finfo(sq.dtype).eps)
    return sq.masked_fill_(sq <= scale, 0.0)


def sq_distances(X: torch.Tensor, Z: torch.Tensor, M: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Mahalanobis distances between the rows of two matrices.

    Parameters
    ----------
    X : torch.Tensor, shape (n, d)
    Z : torch.Tensor, shape (m, d)
    M : torch.Tensor, shape (d, d), optional
        Symmetric PSD metric; ``None`` means the identity.

    Returns
    -------
    torch.Tensor, shape (n, m)
        ‖x_i − z_j‖²_M, clamped at 0 (values within rounding error of 0 are exactly 0).
    """
    shift = Z.mean(dim=0)
    X, Z = X - shift, Z - shift
    ZM = Z if M is None else Z @ M
    return _sq_distances_from(X, m_sq_norms(X, M), ZM, (ZM * Z).sum(dim=1))


class Kernel(ABC):
    """A radial Mahalanobis kernel K_M(x, z) = φ(‖x − z‖²_M) with bandwidth L.

    Subclasses define ``from_sq_dist`` (φ) and ``gradient_weight`` (−2φ'), which is all the
    closed-form AGOP and the solvers need.

    Parameters
    ----------
    bandwidth : float
        Length scale L > 0, in the units of the (M-weighted) inputs.
    """

    name: str = ""

    def __init__(self, bandwidth: float = 10.0) -> None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise TypeError(f"bandwidth must be a positive number, got {bandwidth!r}")
        if not bandwidth > 0 or bandwidth == float("inf"):
            raise ValueError(f"bandwidth must be a positive finite number, got {bandwidth!r}")
        self.bandwidth = float(bandwidth)

    @abstractmethod
    def from_sq_dist(self, sq: torch.Tensor) -> torch.Tensor:
        """Kernel values φ(s) from squared distances s (any shape)."""

    @abstractmethod
    def gradient_weight(self, K: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """The weight w = −2φ'(s) with ∇_z K = w · M(x − z); 0 where s = 0 and φ' is singular."""

    #: Largest value of k(x, x) over all x (β in EigenPro); 1 for every kernel here.
    max_diagonal: float = 1.0

    def from_sq_dist_(self, sq: torch.Tensor) -> torch.Tensor:
        """Kernel values φ(s) that may overwrite ``sq`` (its owner no longer needs it).

        The blocked computations call this on the distance blocks they create: the built-in
        kernels compute φ in place, sparing the temporaries of a chain of elementwise
        operations on an (m, n) block (not differentiable: autograd needs ``from_sq_dist``).
        The default returns ``from_sq_dist(sq)``.
        """
        return self.from_sq_dist(sq)

    def value_and_weight(self, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel values and gradient weights from squared distances (may reuse ``sq``)."""
        K = self.from_sq_dist(sq)
        return K, self.gradient_weight(K, sq)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bandwidth={self.bandwidth!r})"

    def __call__(
        self,
        X: torch.Tensor,
        Z: torch.Tensor,
        M: torch.Tensor | None = None,
        *,
        memory_gb: float | None = None,
    ) -> torch.Tensor:
        """Kernel matrix K_M(X, Z).

        Parameters
        ----------
        X : torch.Tensor, shape (n, d)
        Z : torch.Tensor, shape (m, d)
        M : torch.Tensor, shape (d, d), optional
            Metric; ``None`` means the identity.
        memory_gb : float, optional
            Budget for the temporaries besides the (n, m) result; ``None``: a safe default
            (on the CPU blocks of at most 256 MiB, which are faster than larger ones).

        Returns
        -------
        torch.Tensor, shape (n, m)
        """
        out = torch.empty(X.shape[0], Z.shape[0], dtype=X.dtype, device=X.device)
        for rows, block in self.blocks(X, Z, M, memory_gb=memory_gb):
            out[rows] = block
        return out

    def blocks(
        self,
        X: torch.Tensor,
        Z: torch.Tensor,
        M: torch.Tensor | None = None,
        *,
        memory_gb: float | None = None,
        rows: int | None = None,
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(rows, K_M(X[rows], Z))`` over row blocks of ``X``.

        The blocks have ``rows`` rows each (the last may have fewer) or, by default, as many
        as the budget ``memory_gb`` allows for three (rows, m) temporaries.
        """
        if rows is None:
            budget = kernel_block_budget(memory_gb, X.device)
            rows = rows_per_block(budget, 3 * Z.shape[0] * X.element_size(), X.shape[0], 32)
        else:
            check_number(rows, "rows", integer=True, low=1)
        shift = Z.mean(dim=0)
        Z = Z - shift
        ZM = Z if M is None else Z @ M
        z_sq = (ZM * Z).sum(dim=1)
        for start in range(0, X.shape[0], rows):
            block = slice(start, start + rows)
            Xb = X[block] - shift
            yield block, self.from_sq_dist_(_sq_distances_from(Xb, m_sq_norms(Xb, M), ZM, z_sq))

    def apply(
        self,
        Z: torch.Tensor,
        X: torch.Tensor,
        alpha: torch.Tensor,
        M: torch.Tensor | None = None,
        *,
        memory_gb: float | None = None,
    ) -> torch.Tensor:
        """The kernel predictor K_M(Z, X) α without forming the full (m, n) matrix.

        Parameters
        ----------
        Z : torch.Tensor, shape (m, d)
            Evaluation points.
        X : torch.Tensor, shape (n, d)
            Centres.
        alpha : torch.Tensor, shape (n, c)
            Coefficients.
        M : torch.Tensor, shape (d, d), optional
        memory_gb : float, optional
            Budget for the temporaries, as in ``__call__``.

        Returns
        -------
        torch.Tensor, shape (m, c)
        """
        out = torch.empty(Z.shape[0], alpha.shape[1], dtype=alpha.dtype, device=alpha.device)
        for rows, block in self.blocks(Z, X, M, memory_gb=memory_gb):
            out[rows] = block @ alpha
        return out


class LaplaceKernel(Kernel):
    """Laplace kernel exp(−‖x − z‖_M / L)."""

    name = "laplace"

    def from_sq_dist(self, sq: torch.Tensor) -> torch.Tensor:
        return torch.exp(-sq.sqrt() / self.bandwidth)

    def from_sq_dist_(self, sq: torch.Tensor) -> torch.Tensor:
        return sq.sqrt_().mul_(-1.0 / self.bandwidth).exp_()

    def gradient_weight(self, K: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        dist = sq.sqrt()
        safe = torch.where(dist > 0, dist, torch.ones_like(dist))
        return torch.where(dist > 0, K / (self.bandwidth * safe), torch.zeros_like(K))

    def value_and_weight(self, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel values and weights K/(L·r), sharing one square root; overwrites ``sq``."""
        dist = sq.sqrt_()
        K = torch.exp(dist * (-1.0 / self.bandwidth))
        weight = K / dist  # +inf where dist = 0
        return K, weight.masked_fill_(dist == 0, 0.0).mul_(1.0 / self.bandwidth)


class GaussianKernel(Kernel):
    """Gaussian kernel exp(−‖x − z‖²_M / (2L²))."""

    name = "gaussian"

    def from_sq_dist(self, sq: torch.Tensor) -> torch.Tensor:
        return torch.exp(-sq / (2.0 * self.bandwidth**2))

    def from_sq_dist_(self, sq: torch.Tensor) -> torch.Tensor:
        return sq.mul_(-0.5 / self.bandwidth**2).exp_()

    def gradient_weight(self, K: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return K / self.bandwidth**2


class GeneralizedLaplaceKernel(Kernel):
    """Generalised Laplace kernel exp(−‖x − z‖_M^γ / L^γ), 0 < γ ≤ 2.

    Parameters
    ----------
    bandwidth : float
        Length scale L > 0.
    exponent : float
        γ in (0, 2]; γ = 1 is the Laplace kernel, γ = 2 a Gaussian of bandwidth L/√2.
    """

    name = "gen_laplace"

    def __init__(self, bandwidth: float = 10.0, exponent: float = 1.0) -> None:
        super().__init__(bandwidth)
        self.exponent = _check_exponent(exponent)

    def __repr__(self) -> str:
        return f"GeneralizedLaplaceKernel(bandwidth={self.bandwidth!r}, exponent={self.exponent!r})"

    def from_sq_dist(self, sq: torch.Tensor) -> torch.Tensor:
        return torch.exp(-(sq ** (self.exponent / 2)) / self.bandwidth**self.exponent)

    def from_sq_dist_(self, sq: torch.Tensor) -> torch.Tensor:
        return sq.pow_(self.exponent / 2).mul_(-1.0 / self.bandwidth**self.exponent).exp_()

    def gradient_weight(self, K: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        gamma = self.exponent
        safe = torch.where(sq > 0, sq, torch.ones_like(sq))
        weight = gamma * K * safe ** (gamma / 2 - 1) / self.bandwidth**gamma
        return torch.where(sq > 0, weight, torch.zeros_like(K))


def _check_exponent(exponent: float) -> float:
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise TypeError(f"exponent must be a number in (0, 2], got {exponent!r}")
    if not 0 < exponent <= 2:
        raise ValueError(f"exponent must lie in (0, 2], got {exponent!r}")
    return float(exponent)


#: The kernels an estimator's ``kernel`` parameter can name.
KERNELS: dict[str, type[Kernel]] = {
    "laplace": LaplaceKernel,
    "gaussian": GaussianKernel,
    "gen_laplace": GeneralizedLaplaceKernel,
}


def make_kernel(kernel: str | Kernel, bandwidth: float = 10.0, exponent: float = 1.0) -> Kernel:
    """Build a kernel from its name, or return a :class:`Kernel` instance unchanged.

    Parameters
    ----------
    kernel : {"laplace", "gaussian", "gen_laplace"} or Kernel
    bandwidth : float
        Length scale L > 0.
    exponent : float
        γ in (0, 2]; used by ``"gen_laplace"`` and checked for every name.
    """
    if isinstance(kernel, Kernel):
        return kernel
    if not isinstance(kernel, str):
        raise TypeError(f"kernel must be a kernel name or a Kernel, got {type(kernel).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    _check_exponent(exponent)
    if kernel == "gen_laplace":
        return GeneralizedLaplaceKernel(bandwidth, exponent)
    return KERNELS[kernel](bandwidth)
