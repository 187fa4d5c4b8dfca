"""Random feature maps: distributions, kernel approximation, reproducibility, state."""

import pytest
import torch

from deeprfm.features import LaplaceRandomFeatures, RandomFeatureMap, ReLURandomFeatures


def _fit(feature_map, d, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return feature_map.fit(d, generator=generator, device=torch.device("cpu"), dtype=torch.float64)


def test_relu_features_weight_scale_and_output():
    fmap = _fit(ReLURandomFeatures(width=4000), d=50)
    assert fmap.weight.shape == (4000, 50) and fmap.bias is None
    assert abs(fmap.weight.var().item() * 50 - 1) < 0.05
    X = torch.randn(7, 50, dtype=torch.float64)
    torch.testing.assert_close(fmap.transform(X), torch.relu(X @ fmap.weight.T))
    # E[relu(w·x)²] = ‖x‖²/(2d): the map roughly preserves norms up to width/(2d)
    ratio = fmap.transform(X).pow(2).sum(1) / (X.pow(2).sum(1) * 4000 / 100)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.15)


def test_relu_torch_init_and_bias():
    fmap = _fit(ReLURandomFeatures(width=300, bias=True, init="torch"), d=30)
    bound = 1 / 30**0.5
    assert fmap.weight.abs().max() <= bound and fmap.bias.abs().max() <= bound
    assert fmap.bias.shape == (300,)


def test_laplace_random_fourier_features_approximate_the_kernel():
    gamma, d = 0.7, 3
    fmap = _fit(LaplaceRandomFeatures(width=20000, scale=gamma), d=d)
    X = torch.randn(6, d, dtype=torch.float64)
    features = fmap.transform(X)
    exact = torch.exp(-gamma * torch.cdist(X, X, p=1))
    assert (features @ features.T - exact).abs().max() < 0.05


def test_reproducible_and_state_round_trip():
    a = _fit(ReLURandomFeatures(width=20, bias=True), d=5, seed=1)
    b = _fit(ReLURandomFeatures(width=20, bias=True), d=5, seed=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    for fmap in (a, _fit(LaplaceRandomFeatures(width=20, scale=2.0), d=5)):
        rebuilt = RandomFeatureMap.from_state_dict(fmap.config(), fmap.state_dict())
        X = torch.randn(4, 5, dtype=torch.float64)
        torch.testing.assert_close(rebuilt.transform(X), fmap.transform(X))


def test_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        ReLURandomFeatures(width=0)
    with pytest.raises(TypeError, match="width"):
        ReLURandomFeatures(width=2.5)
    with pytest.raises(ValueError, match="init"):
        ReLURandomFeatures(init="xavier")
    with pytest.raises(ValueError, match="scale"):
        LaplaceRandomFeatures(scale=0.0)
    with pytest.raises(RuntimeError, match="fitted"):
        ReLURandomFeatures().transform(torch.zeros(2, 3))
    fmap = _fit(ReLURandomFeatures(width=4), d=3)
    with pytest.raises(ValueError, match="features"):
        fmap.transform(torch.zeros(2, 5, dtype=torch.float64))
