"""Kernels: values against direct formulas, blocking, validation."""

import math

import pytest
import torch
from conftest import direct_sq_distances, random_psd

import deeprfm._memory
from deeprfm.kernels import (
    GaussianKernel,
    GeneralizedLaplaceKernel,
    Kernel,
    LaplaceKernel,
    make_kernel,
    sq_distances,
)

KERNELS = [LaplaceKernel(2.0), GaussianKernel(1.5), GeneralizedLaplaceKernel(2.0, 0.7)]


def _reference(kernel, sq):
    r = sq.sqrt()
    if isinstance(kernel, GeneralizedLaplaceKernel):
        return torch.exp(-(r**kernel.exponent) / kernel.bandwidth**kernel.exponent)
    if isinstance(kernel, LaplaceKernel):
        return torch.exp(-r / kernel.bandwidth)
    return torch.exp(-(r**2) / (2 * kernel.bandwidth**2))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_kernel_matches_direct_formula(kernel):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    Z = torch.randn(20, 5, generator=g, dtype=torch.float64)
    M = random_psd(5, g)
    expected = _reference(kernel, direct_sq_distances(X, Z, M))
    torch.testing.assert_close(kernel(X, Z, M), expected, rtol=1e-10, atol=1e-12)


def test_sq_distances_clamped_and_exact_zero_on_diagonal():
    g = torch.Generator().manual_seed(1)
    X = 100 * torch.randn(50, 8, generator=g)
    sq = sq_distances(X, X)
    assert (sq >= 0).all()
    assert (torch.diagonal(sq) == 0).all()


@pytest.mark.parametrize("memory_gb", [1e-6, 1e-4, 1.0])
def test_blocked_kernel_does_not_depend_on_budget(memory_gb):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(300, 7, generator=g, dtype=torch.float64)
    Z = torch.randn(90, 7, generator=g, dtype=torch.float64)
    alpha = torch.randn(90, 3, generator=g, dtype=torch.float64)
    kernel = LaplaceKernel(3.0)
    full = kernel.from_sq_dist(sq_distances(X, Z))
    torch.testing.assert_close(kernel(X, Z, memory_gb=memory_gb), full)
    torch.testing.assert_close(kernel.apply(X, Z, alpha, memory_gb=memory_gb), full @ alpha)


def test_generalized_laplace_with_exponent_one_is_laplace():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(10, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(GeneralizedLaplaceKernel(2.0, 1.0)(X, X), LaplaceKernel(2.0)(X, X))


def test_gradient_weight_is_zero_at_zero_distance():
    sq = torch.tensor([0.0, 4.0], dtype=torch.float64)
    for kernel in (LaplaceKernel(2.0), GeneralizedLaplaceKernel(2.0, 0.5)):
        w = kernel.gradient_weight(kernel.from_sq_dist(sq), sq)
        assert w[0] == 0 and math.isfinite(w[1]) and w[1] > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel": "cosine"}, ValueError, "kernel must be one of"),
        ({"kernel": 3}, TypeError, "kernel must be"),
        ({"kernel": "laplace", "bandwidth": 0.0}, ValueError, "bandwidth"),
        ({"kernel": "laplace", "bandwidth": -1.0}, ValueError, "bandwidth"),
        ({"kernel": "laplace", "bandwidth": "10"}, TypeError, "bandwidth"),
        ({"kernel": "gen_laplace", "exponent": 2.5}, ValueError, "exponent"),
        ({"kernel": "gen_laplace", "exponent": 0.0}, ValueError, "exponent"),
    ],
)
def test_make_kernel_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_kernel(**kwargs)


def test_make_kernel_passes_instances_through():
    kernel = GaussianKernel(4.0)
    assert make_kernel(kernel) is kernel
    assert make_kernel("gen_laplace", 2.0, 1.5).exponent == 1.5


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_value_and_weight_agrees_with_separate_calls(kernel):
    sq = torch.tensor([0.0, 0.25, 4.0, 9.0], dtype=torch.float64)
    K = kernel.from_sq_dist(sq)
    values, weights = kernel.value_and_weight(sq.clone())
    torch.testing.assert_close(values, K)
    torch.testing.assert_close(weights, kernel.gradient_weight(K, sq))


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_from_sq_dist_keeps_its_input_and_the_in_place_variant_reuses_it(kernel):
    sq = torch.tensor([[0.0, 0.25], [4.0, 9.0]], dtype=torch.float64)
    original = sq.clone()
    values = kernel.from_sq_dist(sq)
    torch.testing.assert_close(sq, original)
    torch.testing.assert_close(values, _reference(kernel, original))
    in_place = kernel.from_sq_dist_(sq)
    assert in_place.data_ptr() == sq.data_ptr()
    torch.testing.assert_close(in_place, values)


def test_a_user_kernel_with_only_from_sq_dist_works_blocked():
    class Cauchy(Kernel):
        def from_sq_dist(self, sq):
            return 1 / (1 + sq / self.bandwidth**2)

        def gradient_weight(self, K, sq):
            return 2 * K**2 / self.bandwidth**2

    g = torch.Generator().manual_seed(5)
    X = torch.randn(50, 3, generator=g, dtype=torch.float64)
    expected = 1 / (1 + direct_sq_distances(X, X[:7], torch.eye(3, dtype=torch.float64)) / 4.0)
    torch.testing.assert_close(Cauchy(2.0)(X, X[:7], memory_gb=1e-6), expected)


def test_cpu_blocks_are_capped_within_any_budget(monkeypatch):
    monkeypatch.setattr(deeprfm._memory, "CPU_KERNEL_BLOCK", 3 * 200 * 4 * 50)  # 50 rows
    X, Z = torch.randn(120, 3), torch.randn(200, 3)
    kernel = LaplaceKernel(2.0)
    assert [block.shape[0] for _, block in kernel.blocks(X, Z)] == [50, 50, 20]
    # a large budget does not make CPU blocks larger (they would be slower); a small one is kept
    assert [block.shape[0] for _, block in kernel.blocks(X, Z, memory_gb=1.0)] == [50, 50, 20]
    small = 3 * 200 * 4 * 40 / 1024**3  # 40 rows
    assert [block.shape[0] for _, block in kernel.blocks(X, Z, memory_gb=small)] == [40, 40, 40]
    torch.testing.assert_close(kernel(X, Z), kernel(X, Z, memory_gb=small))


def test_blocks_of_a_given_height():
    X, Z = torch.randn(70, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    kernel = GaussianKernel(1.5)
    blocks = list(kernel.blocks(X, Z, rows=30))
    assert [block.shape[0] for _, block in blocks] == [30, 30, 10]
    torch.testing.assert_close(torch.cat([block for _, block in blocks]), kernel(X, Z))
    with pytest.raises(ValueError, match="rows"):
        next(kernel.blocks(X, Z, rows=0))
    with pytest.raises(TypeError, match="rows"):
        next(kernel.blocks(X, Z, rows=2.5))


def test_float32_kernel_with_a_large_common_offset_stays_positive_definite():
    """ReLU-like features share a large mean: the distance expansion must not lose the spread."""
    g = torch.Generator().manual_seed(4)
    spread = torch.randn(400, 50, generator=g, dtype=torch.float64) * 0.05
    offset = 30 * torch.ones(50, dtype=torch.float64)
    kernel = LaplaceKernel(10.0)
    exact = kernel(spread, spread)
    shifted = kernel((spread + offset).float(), (spread + offset).float()).double()
    assert (shifted - exact).abs().max() < 1e-4
    assert torch.linalg.eigvalsh(shifted + 1e-3 * torch.eye(400, dtype=torch.float64))[0] > 0
    torch.testing.assert_close(
        sq_distances((spread + offset).float(), spread[:7].float() + offset.float()).double(),
        sq_distances(spread, spread[:7]),
        atol=1e-4,
        rtol=1e-3,
    )
