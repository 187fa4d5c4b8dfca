"""Closed-form kernel AGOP against torch.func autograd; the generic AGOP against jacrev."""

import numpy as np
import pytest
import torch
from conftest import direct_sq_distances, random_psd
from hypothesis import given, settings
from hypothesis import strategies as st

from deeprfm.agop import DEFAULT_PROJECTIONS, agop, kernel_agop, normalize_matrix, psd_power
from deeprfm.kernels import GaussianKernel, GeneralizedLaplaceKernel, LaplaceKernel
from deeprfm.probes import NeuralProbe

KERNELS = [LaplaceKernel(2.0), GaussianKernel(1.5), GeneralizedLaplaceKernel(2.5, 0.6)]


def _predictor(kernel, X, alpha, M):
    """f(Z) = K_M(Z, X) α from explicit differences (independent of the closed form)."""
    return lambda Z: kernel.from_sq_dist(direct_sq_distances(Z, X, M)) @ alpha


def _problem(seed, metric):
    g = torch.Generator().manual_seed(seed)
    n, m, d, c = 40, 25, 6, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Z = torch.randn(m, d, generator=g, dtype=torch.float64)
    alpha = torch.randn(n, c, generator=g, dtype=torch.float64)
    M = torch.eye(d, dtype=torch.float64) if metric == "identity" else random_psd(d, g)
    return X, Z, alpha, M


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("metric", ["identity", "psd"])
@pytest.mark.parametrize("centering", [False, True])
@pytest.mark.parametrize("diag", [False, True])
def test_closed_form_matches_autograd(kernel, metric, centering, diag):
    X, Z, alpha, M = _problem(0, metric)
    expected = agop(_predictor(kernel, X, alpha, M), Z, centering=centering)
    if diag:
        expected = torch.diag(torch.diagonal(expected))
    got = kernel_agop(kernel, X, alpha, M, Z, centering=centering, diag=diag)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_closed_form_at_the_centres_drops_the_self_term(kernel):
    """Evaluated at the centres, each point's own (zero-distance) term contributes 0."""
    X, _, alpha, M = _problem(1, "psd")
    n = X.shape[0]

    def leave_self_out(i):
        keep = torch.arange(n) != i
        return _predictor(kernel, X[keep], alpha[keep], M)

    rows = [torch.func.jacrev(lambda z, i=i: leave_self_out(i)(z[None])[0])(X[i]) for i in range(n)]
    jac = torch.stack(rows)  # (n, c, d)
    expected = torch.einsum("ncd,nce->de", jac, jac) / n
    torch.testing.assert_close(kernel_agop(kernel, X, alpha, M), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("memory_gb", [1e-6, 2e-5, 1.0])
def test_closed_form_does_not_depend_on_blocking(memory_gb):
    X, Z, alpha, M = _problem(2, "psd")
    kernel = LaplaceKernel(2.0)
    reference = kernel_agop(kernel, X, alpha, M, Z, memory_gb=1.0)
    torch.testing.assert_close(
        kernel_agop(kernel, X, alpha, M, Z, memory_gb=memory_gb), reference, rtol=1e-10, atol=0
    )


def test_generic_agop_matches_per_point_jacobians():
    g = torch.Generator().manual_seed(3)
    W1 = torch.randn(5, 4, generator=g, dtype=torch.float64)
    W2 = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def fn(x):
        return torch.tanh(x @ W1) @ W2

    X = torch.randn(17, 5, generator=g, dtype=torch.float64)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda x: fn(x[None])[0], x) for x in X])
    expected = torch.einsum("ncd,nce->de", jac, jac) / len(X)
    torch.testing.assert_close(agop(fn, X, batch_size=4), expected)
    centred = jac - jac.mean(0)
    torch.testing.assert_close(
        agop(fn, X, centering=True), torch.einsum("ncd,nce->de", centred, centred) / len(X)
    )


def test_random_projection_agop_is_unbiased_and_converges():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(6, 50, generator=g, dtype=torch.float64)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)

    def fn(x):
        return torch.sin(x @ W)

    exact = agop(fn, X)
    errors = [
        (agop(fn, X, agop_outputs=k, random_state=0) - exact).norm() / exact.norm()
        for k in (4, 400)
    ]
    assert errors[1] < errors[0] and errors[1] < 0.15


def test_random_projections_are_drawn_per_sample_whatever_the_batching():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 30, generator=g, dtype=torch.float64)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)

    def fn(x):
        return torch.tanh(x @ W)

    estimates = [
        agop(fn, X, agop_outputs=3, random_state=7, batch_size=size) for size in (1, 7, 50)
    ]
    for estimate in estimates[1:]:
        torch.testing.assert_close(estimate, estimates[0], rtol=1e-12, atol=1e-12)
    other_seed = agop(fn, X, agop_outputs=3, random_state=8)
    assert (other_seed - estimates[0]).norm() > 1e-3 * estimates[0].norm()
    # "random" is DEFAULT_PROJECTIONS projections
    torch.testing.assert_close(
        agop(fn, X, agop_outputs="random", random_state=7),
        agop(fn, X, agop_outputs=DEFAULT_PROJECTIONS, random_state=7),
    )


def test_the_probe_draws_the_same_projections_as_agop():
    g = torch.Generator().manual_seed(6)
    layer = torch.nn.Linear(5, 40, bias=False).double()
    X = torch.randn(30, 5, generator=g, dtype=torch.float64)
    expected = agop(layer, X, agop_outputs=4, random_state=3, batch_size=8)
    probe = NeuralProbe(layer, agop_outputs=4, random_state=3, collapse=False, nfm=False)
    batches = [X[i : i + 11] for i in range(0, 30, 11)]
    measured = probe.measure(batches)["layers/model"]["agop"].values
    np.testing.assert_allclose(measured, expected.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_generic_agop_bad_arguments():
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="agop_outputs"):
        agop(lambda x: x, X, agop_outputs=0)
    with pytest.raises(ValueError, match="agop_outputs"):
        agop(lambda x: x, X, agop_outputs="some")
    with pytest.raises(TypeError, match="agop_outputs"):
        agop(lambda x: x, X, agop_outputs=2.5)
    with pytest.raises(ValueError, match="batch_size"):
        agop(lambda x: x, X, batch_size=0)
    with pytest.raises(ValueError, match="fn must return"):
        agop(lambda x: x[:, :, None], X)


@settings(max_examples=25, deadline=None)
@given(
    power=st.sampled_from([0.5, 1.0, 2.0, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_psd_power_composes(power, seed):
    g = torch.Generator().manual_seed(seed)
    A = random_psd(5, g)
    torch.testing.assert_close(psd_power(psd_power(A, power), 1 / power), A, rtol=1e-6, atol=1e-9)


def test_psd_power_clamps_negative_eigenvalues():
    A = torch.diag(torch.tensor([4.0, -1e-9, 1.0], dtype=torch.float64))
    R = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    rotated = R @ A @ R.T + 1e-3 * torch.ones(3, 3, dtype=torch.float64)
    assert torch.linalg.eigvalsh(psd_power(rotated, 0.5)).min() >= -1e-12
    torch.testing.assert_close(
        psd_power(A, 0.5), torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    )


@pytest.mark.parametrize(
    ("method", "check"),
    [
        ("max", lambda B: B.abs().max()),
        ("trace", torch.trace),
        ("spectral", lambda B: torch.linalg.eigvalsh(B)[-1]),
    ],
)
def test_normalize_matrix(method, check):
    A = random_psd(4, torch.Generator().manual_seed(5)) * 7
    torch.testing.assert_close(check(normalize_matrix(A, method)), torch.tensor(1.0).double())
    assert normalize_matrix(A, None) is A
    with pytest.raises(ValueError, match="normalize"):
        normalize_matrix(A, "frobenius")
    with pytest.warns(RuntimeWarning, match="zero AGOP"):
        normalize_matrix(torch.zeros(3, 3), method)
