"""NeuralProbe collapse stages: input h, projected (WᵀW)^{1/2} h, output W h + b (or after σ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis import collapse_metrics
from deeprfm.probes import NeuralProbe
from deeprfm.probes.stages import following_activation, projection_matrix

F64 = torch.float64
ALL_STAGES = ("input", "projected", "output")


def labelled(n: int, d: int, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    X = torch.randn(n, d, generator=g, dtype=F64) + 2.0 * torch.randn(classes, d, generator=g)[y]
    return X, y


def hidden_relu_mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9, bias=bias),
        nn.ReLU(),
        nn.Linear(9, 5, bias=bias),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(F64)


def measured(model, data, **kwargs):
    probe = NeuralProbe(model, agop=False, nfm=False, stages=ALL_STAGES, **kwargs)
    return probe.measure(data).ds


def test_stages_of_a_linear_layer_equal_direct_formulas():
    model = hidden_relu_mlp(bias=False)
    X, y = labelled(60, 6)
    ds = measured(model, (X, y))
    assert ds.nc1.dims == ("layer", "stage") and list(ds.stage.values) == list(ALL_STAGES)
    first = model[0]
    W = first.weight.detach()
    root = torch.linalg.eigh(W.T @ W)  # an independent (WᵀW)^{1/2}
    sqrt_wtw = (
        root.eigenvectors @ torch.diag(root.eigenvalues.clamp_min(0).sqrt()) @ (root.eigenvectors.T)
    )
    for stage, features in {
        "input": X,
        "projected": X @ sqrt_wtw,
        "output": X @ W.T,
    }.items():
        expected = collapse_metrics(features, y.numpy())
        for metric in ("nc1", "nc1_trace", "nc2", "cdnv", "ncc_acc"):
            assert float(ds[metric].sel(layer="0", stage=stage)) == pytest.approx(
                float(expected[metric]), rel=1e-7, abs=1e-12
            ), (stage, metric)
    # NC1 is isometry invariant: (WᵀW)^{1/2} h and W h have the same NC1
    np.testing.assert_allclose(
        ds.nc1_trace.sel(stage="projected"), ds.nc1_trace.sel(stage="output"), rtol=1e-8
    )
    assert list(ds.output_source.values) == ["0", "2", "4"]


def test_output_after_the_activation_is_the_next_layers_input():
    model = hidden_relu_mlp()
    X, y = labelled(50, 6, seed=1)
    ds = measured(model, (X, y), output_stage="activation")
    assert list(ds.output_source.values) == ["1", "3", "4"]  # ReLU, Tanh, the head itself
    for earlier, later in (("0", "2"), ("2", "4")):
        np.testing.assert_allclose(
            ds.nc1.sel(layer=earlier, stage="output"), ds.nc1.sel(layer=later, stage="input")
        )
    expected = collapse_metrics(torch.relu(model[0](X)).detach(), y.numpy())
    assert float(ds.nc1_trace.sel(layer="0", stage="output")) == pytest.approx(
        float(expected.nc1_trace), rel=1e-9
    )
    plain = measured(model, (X, y))
    assert not np.allclose(plain.nc1.sel(stage="output")[:2], ds.nc1.sel(stage="output")[:2])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 5, 3, padding=1, bias=False),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
        nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="reflect", bias=False),
    ],
)
def test_projected_conv_patches_have_the_nc1_of_the_conv_output(conv):
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3)).to(F64)
    g = torch.Generator().manual_seed(2)
    y = torch.arange(24) % 3
    shift = torch.randn(3, conv.in_channels, 1, 1, generator=g, dtype=F64)
    X = torch.randn(24, conv.in_channels, 6, 6, generator=g, dtype=F64) + shift[y]
    model(X)  # materialise the lazy head
    ds = measured(model, (X, y), layers=["0"])
    # every patch is mapped by the same isometry from (WᵀW)^{1/2} p to W p
    for metric in ("nc1", "nc1_trace", "cdnv"):
        projected = float(ds[metric].sel(layer="0", stage="projected"))
        assert projected == pytest.approx(
            float(ds[metric].sel(layer="0", stage="output")), rel=1e-7
        )
    assert not np.isclose(
        float(ds.nc1_trace.sel(layer="0", stage="input")),
        float(ds.nc1_trace.sel(layer="0", stage="projected")),
    )


def test_projection_matrix_squares_to_the_neural_feature_matrix():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 7, generator=g, dtype=F64)  # rank 4 < d: (WᵀW) is singular
    root = projection_matrix(W)
    torch.testing.assert_close(root @ root, W.T @ W)
    torch.testing.assert_close(root, root.T)


def test_following_activation_is_the_next_sibling_only_when_it_is_an_activation():
    model = nn.Sequential(
        nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)
    )
    nested = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)), nn.Linear(3, 1))
    assert following_activation(model, "0")[0] == "1"
    assert following_activation(model, "2") is None  # a BatchNorm comes first
    assert following_activation(model, "5") is None  # the last child
    assert following_activation(model, "") is None  # the model itself
    assert following_activation(nested, "0.0")[0] == "0.1"


def test_in_place_activation_is_measured_after_it_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).to(F64)
    X, y = labelled(40, 4, classes=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ds = measured(model, (X, y), output_stage="activation")
    expected = collapse_metrics(torch.relu(model[0](X)).detach(), y.numpy())
    assert float(ds.nc1.sel(layer="0", stage="output")) == pytest.approx(float(expected.nc1))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


class SkipsItsActivation(nn.Module):
    """Registers fc, act in that order but applies act to something other than fc's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.fc(self.act(x)))


def test_an_activation_that_does_not_follow_its_layer_is_reported():
    model = SkipsItsActivation().to(F64)
    X, y = labelled(20, 4, classes=2)
    with pytest.raises(ValueError, match=r"output_stage: the activations \{'fc': 'act'\}"):
        measured(model, (X, y), output_stage="activation")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stages": ("input", "hidden")}, ValueError, "stages"),
        ({"stages": ()}, ValueError, "stages"),
        ({"stages": ("input", "input")}, ValueError, "more than once"),
        ({"stages": [1]}, TypeError, "stages"),
        ({"output_stage": "relu"}, ValueError, "output_stage"),
    ],
)
def test_bad_stage_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralProbe(hidden_relu_mlp(), **kwargs)


def test_projected_stage_is_nan_with_a_warning_where_d_by_d_does_not_fit():
    model = hidden_relu_mlp()
    X, y = labelled(30, 6)
    probe = NeuralProbe(model, agop=False, nfm=False, stages=("input", "projected"))
    probe.memory_gb = 6 * 8 * 7**2 / 1024**3  # full form for d = 6 and 5, not for d = 9
    with pytest.warns(RuntimeWarning, match=r"'2 \(projected\)'"):
        ds = probe.measure((X, y)).ds
    assert np.isnan(float(ds.nc1.sel(layer="2", stage="projected")))
    assert np.isfinite(ds.nc1.sel(stage="input")).all()


def test_right_singular_structure_removes_most_within_class_variability(capsys, reproduce_dnc):
    example = reproduce_dnc
    X_train, _, y_train, _ = example.standardised_digits()
    X, y = torch.tensor(X_train, dtype=torch.float32), torch.as_tensor(y_train)
    model = example.small_init_mlp(X, y, epochs=100, seed=0)
    assert (model(X).argmax(dim=1) == y).float().mean() >= 0.99
    ds = measured(model, (X, y), output_stage="activation")
    nc1 = ds.nc1_trace.to_pandas()
    with capsys.disabled():
        print("\n[digits MLP, small init] NC1 (trace) per stage\n", nc1.round(4))
    hidden = ["0", "2", "4", "6"]
    assert (nc1.loc[hidden, "projected"] < nc1.loc[hidden, "input"]).all()
    by_weights = np.log(nc1.loc[hidden, "input"] / nc1.loc[hidden, "projected"]).sum()
    by_relu = np.log(nc1.loc[hidden, "projected"] / nc1.loc[hidden, "output"]).sum()
    assert by_weights > 2 * abs(by_relu)
