"""Shared fixtures: deterministic generators, small problems, the reproduction example."""

import importlib.util
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def reproduce_dnc():
    """examples/reproduce_dnc.py as a module: tests check the code docs/reproducing.md runs."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        spec = importlib.util.spec_from_file_location(
            "reproduce_dnc", examples / "reproduce_dnc.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(examples))
    return module
