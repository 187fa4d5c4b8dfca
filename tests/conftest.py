"""Shared fixtures: deterministic generators and small problems."""

import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def random_psd(d: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A random symmetric positive definite d×d matrix with a spread of eigenvalues."""
    A = torch.randn(d, d, generator=generator, dtype=dtype)
    return A @ A.T / d + 0.1 * torch.eye(d, dtype=dtype)


def direct_sq_distances(Z: torch.Tensor, X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """‖z_j − x_i‖²_M from explicit differences (m×n): an independent reference."""
    diff = Z[:, None, :] - X[None, :, :]
    return torch.einsum("mnd,de,mne->mn", diff, M, diff)
