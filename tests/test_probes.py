"""NeuralProbe: hook-trick AGOP against brute-force jacrev, real architectures, safety, I/O."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from sklearn.datasets import load_digits
from torch import nn

from analysis import collapse_metrics, stack_curves
from deeprfm.probes import NeuralProbe

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

F64 = torch.float64


# ----------------------------------------------------------------------------- models
class TokenMLP(nn.Module):
    """A Linear applied to every token of (b, T, d) inputs, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(5, 4)
        self.head = nn.Linear(3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x)).flatten(1))


class ResidualCNN(nn.Module):
    """Residual block (grouped, dilated conv; in-place ReLU), strided conv + BatchNorm, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.relu(h + self.conv2(self.act(self.conv1(h))))
        return self.head(torch.relu(self.bn(self.down(h))).flatten(1))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 4)
    ).to(F64)


def residual_cnn() -> ResidualCNN:
    torch.manual_seed(0)
    model = ResidualCNN().to(F64)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def token_mlp() -> TokenMLP:
    torch.manual_seed(0)
    return TokenMLP().to(F64)


def inputs_for(model: nn.Module, n: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = {nn.Sequential: (6,), ResidualCNN: (3, 6, 6), TokenMLP: (3, 5)}[type(model)]
    return torch.randn(n, *shape, generator=g, dtype=F64)


def labels_for(n: int, classes: int = 3) -> torch.Tensor:
    return torch.arange(n) % classes


# ----------------------------------------------------------------------------- references
def reference_agop(model: nn.Module, layer: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_x Σ_c Σ_p J_pᵀ J_p by vmap(jacrev), J_p the Jacobian of the model output with
    respect to the layer's input at position p: a Linear's input vector (per token), or a
    Conv2d's unfolded C_in·kh·kw patch (the conv recomputed per group from the patches)."""
    model.eval()
    perturbation = {}

    def linear_hook(module, args):
        return (args[0] + perturbation["e"].reshape(args[0].shape),)

    def conv_hook(module, args, out):
        (h,) = args
        patches = F.unfold(h, module.kernel_size, module.dilation, module.padding, module.stride)
        patches = patches + perturbation["e"].transpose(1, 2)  # (b, d, P)
        b, d, p = patches.shape
        g = module.groups
        w = module.weight.reshape(g, module.out_channels // g, d // g)
        conv = torch.einsum("gkd,bgdp->bgkp", w, patches.reshape(b, g, d // g, p))
        conv = conv.reshape(b, module.out_channels, p)
        if module.bias is not None:
            conv = conv + module.bias[:, None]
        return conv.reshape(out.shape)

    seen = {}
    handle = layer.register_forward_hook(lambda m, a, o: seen.update(h=a[0], out=o))
    with torch.no_grad():
        plain = model(X)
    handle.remove()
    if isinstance(layer, nn.Linear):
        positions, d = seen["h"][0].numel() // layer.in_features, layer.in_features
        handle = layer.register_forward_pre_hook(linear_hook)
    else:
        d = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        positions = seen["out"].shape[-2] * seen["out"].shape[-1]
        handle = layer.register_forward_hook(conv_hook)

    def single(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        perturbation["e"] = e[None]
        return model(x[None])[0]

    try:
        zero = torch.zeros(X.shape[0], positions, d, dtype=X.dtype)
        with torch.no_grad():  # the perturbed forward reproduces the model at e = 0
            torch.testing.assert_close(torch.vmap(single)(zero, X), plain)
        jac = torch.vmap(torch.func.jacrev(single))(zero, X)  # (n, c, P, d)
    finally:
        handle.remove()
    return torch.einsum("ncpd,ncpe->de", jac, jac) / X.shape[0]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """(k, d) matrix of a Linear / (grouped) Conv2d, built block by block."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w
    g, k = module.groups, module.out_channels
    per_group = w[0].numel()
    out = torch.zeros(k, per_group * g, dtype=w.dtype)
    for j in range(g):
        rows = slice(j * k // g, (j + 1) * k // g)
        out[rows, j * per_group : (j + 1) * per_group] = w[rows].reshape(k // g, -1)
    return out


def layer_input_features(model: nn.Module, layer: nn.Module, X: torch.Tensor) -> torch.Tensor:
    captured = {}
    handle = layer.register_forward_hook(lambda m, a, o: captured.update(h=a[0]))
    with torch.no_grad():
        model.eval()(X)
    handle.remove()
    return captured["h"]


# ----------------------------------------------------------------------------- AGOP / NFM
@pytest.mark.parametrize("make", [mlp, residual_cnn, token_mlp])
def test_hook_agop_and_nfm_match_brute_force(make):
    model = make()
    X = inputs_for(model)
    probe = NeuralProbe(model, collapse=False)
    tree = probe.measure((X, labels_for(len(X))))
    modules = dict(model.named_modules())
    assert list(tree.ds.layer.values) == probe.layer_names
    for name in probe.layer_names:
        group = tree[f"layers/{name}"].ds
        expected = reference_agop(model, modules[name], X)
        torch.testing.assert_close(
            torch.from_numpy(group.agop.values), expected, rtol=1e-10, atol=1e-13
        )
        w = dense_weight(modules[name])
        torch.testing.assert_close(torch.from_numpy(group.nfm.values), w.T @ w)
        assert group.attrs["fan_in"] == w.shape[1] == group.sizes["feature_i"]
    assert set(probe.layer_names) == {
        n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def test_positions_and_layer_types_of_the_residual_cnn():
    model = residual_cnn()
    tree = NeuralProbe(model, collapse=False).measure((inputs_for(model), labels_for(10)))
    positions = {name: tree[f"layers/{name}"].attrs["positions"] for name in tree.ds.layer.values}
    assert positions == {"stem": 36, "conv1": 36, "conv2": 36, "down": 9, "head": 1}
    assert list(tree.ds.layer_type.values) == ["Conv2d"] * 4 + ["Linear"]
    assert list(tree.ds.fan_in.values) == [27, 36, 36, 36, 54]


def test_linear_model_agop_equals_its_nfm():
    """For f(x) = Wx + b the Jacobian is W, so AGOP = WᵀW exactly; the root is named 'model'."""
    torch.manual_seed(0)
    model = nn.Linear(7, 4).to(F64)
    X = torch.randn(12, 7, dtype=F64)
    tree = NeuralProbe(model, collapse=False).measure((X, labels_for(12)))
    group = tree["layers/model"].ds
    np.testing.assert_allclose(group.agop.values, group.nfm.values, rtol=1e-12)
    assert float(tree.ds.nfa_corr_agop1.sel(layer="model")) == pytest.approx(1.0)


def test_random_projections_converge_to_the_exact_agop():
    model = mlp()
    X = inputs_for(model, 24)
    data = (X, labels_for(24))
    exact = NeuralProbe(model, collapse=False, nfm=False).measure(data)
    errors = []
    for m in (4, 64, 1024):
        approx = NeuralProbe(model, collapse=False, nfm=False, agop_outputs=m, random_state=0)
        tree = approx.measure(data)
        errors.append(
            max(
                np.linalg.norm(tree[f"layers/{n}"].ds.agop - exact[f"layers/{n}"].ds.agop)
                / np.linalg.norm(exact[f"layers/{n}"].ds.agop)
                for n in exact.ds.layer.values
            )
        )
    # Error ~ 1/sqrt(m): a factor 4 per step in expectation.
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2, errors
    assert errors[2] < 0.05, errors
    # Unbiased: the mean of 32 two-projection estimates is close to the exact AGOP.
    mean = (
        sum(
            NeuralProbe(model, collapse=False, nfm=False, agop_outputs=2, random_state=seed)
            .measure(data)["layers/0"]
            .ds.agop
            for seed in range(32)
        )
        / 32
    )
    exact0 = exact["layers/0"].ds.agop
    assert np.linalg.norm(mean - exact0) / np.linalg.norm(exact0) < 0.08
    # Same seed, same draws; "random" is the default number of projections.
    again = NeuralProbe(model, collapse=False, nfm=False, agop_outputs=1024, random_state=0)
    xr.testing.assert_identical(again.measure(data)["layers/4"].ds, tree["layers/4"].ds)
    rand = NeuralProbe(model, collapse=False, agop_outputs="random", random_state=1)
    assert json.loads(rand.measure(data).attrs["config"])["projections"] == 16


def test_centered_nfm_uses_the_initial_weights():
    model = mlp()
    init = model.state_dict()  # aliases the parameters: the probe must copy it
    snapshot = NeuralProbe(model, centered_nfm=True, collapse=False, agop=False)
    given = NeuralProbe(model, centered_nfm=True, init_weights=init, collapse=False, agop=False)
    from_module = NeuralProbe(
        model, centered_nfm=True, init_weights=mlp(), collapse=False, agop=False
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    data = (inputs_for(model), labels_for(10))
    for probe in (snapshot, given, from_module):
        nfm = probe.measure(data)["layers/0"].ds.nfm.values
        np.testing.assert_allclose(nfm, np.full((6, 6), 9 * 0.01), rtol=1e-12)


def test_diagonal_form_keeps_the_diagonals_of_the_full_matrices():
    model = residual_cnn()
    data = (inputs_for(model), labels_for(10))
    full = NeuralProbe(model, collapse=False).measure(data)
    probe = NeuralProbe(model, collapse=False)
    probe.memory_gb = 6 * 8 * 30**2 / 1024**3  # only d <= 30 (the stem, d = 27) stays full
    with pytest.warns(RuntimeWarning, match="only the diagonals"):
        diag = probe.measure(data)
    assert list(diag.ds.matrix_form.values) == ["full"] + ["diagonal"] * 4
    for name in ["conv1", "conv2", "down", "head"]:
        group = diag[f"layers/{name}"].ds
        assert set(group.data_vars) == {"nfm_diag", "agop_diag"}
        for key in ("nfm", "agop"):
            np.testing.assert_allclose(
                group[f"{key}_diag"].values, np.diag(full[f"layers/{name}"].ds[key].values)
            )
        assert np.isnan(float(diag.ds.nfa_corr.sel(layer=name)))
    stem = float(full.ds.nfa_corr.sel(layer="stem"))
    assert float(diag.ds.nfa_corr.sel(layer="stem")) == pytest.approx(stem, rel=1e-10)


def test_batched_backward_degrades_to_smaller_chunks_on_out_of_memory(monkeypatch):
    model = residual_cnn()
    data = (inputs_for(model), labels_for(10))
    expected = NeuralProbe(model, collapse=False, nfm=False).measure(data)
    grad = torch.autograd.grad
    sizes = []

    def tight(outputs, inputs, grad_outputs=None, **kwargs):
        if kwargs.get("is_grads_batched"):
            sizes.append(grad_outputs.shape[0])
            if grad_outputs.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("simulated")
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", tight)
    got = NeuralProbe(model, collapse=False, nfm=False).measure(data)
    assert sizes[:3] == [3, 1, 1]
    for name in expected.ds.layer.values:
        xr.testing.assert_allclose(got[f"layers/{name}"].ds, expected[f"layers/{name}"].ds)


class _Cube(torch.autograd.Function):
    """x³ with a hand-written backward that is not vmap-able."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):  # through numpy, as an opaque kernel would: vmap cannot batch it
        (x,) = ctx.saved_tensors
        return torch.from_numpy(3 * x.numpy() ** 2 * grad.numpy())


def test_unbatchable_backward_falls_back_to_one_pass_per_output():
    torch.manual_seed(0)
    first, second = nn.Linear(5, 6).to(F64), nn.Linear(6, 3).to(F64)
    plain = nn.Sequential(first, nn.Identity(), second)
    plain[1].forward = lambda x: x**3
    custom = nn.Sequential(first, nn.Identity(), second)
    custom[1].forward = _Cube.apply
    X = torch.randn(8, 5, dtype=F64)
    data = (X, labels_for(8))
    expected = NeuralProbe(plain, collapse=False).measure(data)
    with pytest.warns(RuntimeWarning, match="one backward pass per output"):
        got = NeuralProbe(custom, collapse=False).measure(data)
    xr.testing.assert_allclose(got["layers/0"].ds, expected["layers/0"].ds)


# ----------------------------------------------------------------------------- collapse
def test_collapse_metrics_are_those_of_each_layer_input():
    model = residual_cnn()
    X = inputs_for(model, 30)
    y = torch.tensor([3, 7, 9])[torch.arange(30) % 3]  # arbitrary integer labels
    batches = [(X[i : i + 7], y[i : i + 7]) for i in range(0, 30, 7)]
    tree = NeuralProbe(model, agop=False, nfm=False).measure(batches)
    assert json.loads(tree.attrs["classes"]) == [3, 7, 9]
    for name in ["stem", "down", "head"]:
        features = layer_input_features(model, dict(model.named_modules())[name], X)
        expected = collapse_metrics(features, y.numpy())
        for metric in expected.data_vars:
            assert float(tree.ds[metric].sel(layer=name, stage="input")) == pytest.approx(
                float(expected[metric]), rel=1e-9
            )
    assert not tree["layers/stem"].ds.data_vars  # no matrices requested


def test_max_samples_takes_the_first_samples():
    model = mlp()
    X, y = inputs_for(model, 40), labels_for(40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=7)
    tree = NeuralProbe(model, max_samples=17).measure(loader)
    first = NeuralProbe(model).measure((X[:17], y[:17]))
    assert tree.attrs["num_samples"] == 17
    xr.testing.assert_allclose(tree.ds, first.ds)
    xr.testing.assert_allclose(tree["layers/2"].ds, first["layers/2"].ds)


# ----------------------------------------------------------------------------- real models
def _check_real(model, x, layers="auto", memory_gb=None, **kwargs):
    probe = NeuralProbe(model, layers, **kwargs)
    probe.memory_gb = memory_gb
    y = torch.arange(x.shape[0]) % 2
    tree = probe.measure((x, y))
    names = list(tree.ds.layer.values)
    assert names == probe.layer_names and len(names) > 0
    assert set(tree["layers"].children) == set(names)
    for name in names:
        for var in tree[f"layers/{name}"].ds.data_vars.values():
            assert np.isfinite(var.values).all(), (name, var.name)
    if probe.collapse:
        assert np.isfinite(tree.ds.nc1_trace.values).all()
    return tree


def test_torchvision_resnet18_every_layer():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    budget = 6 * 8 * 600**2 / 1024**3  # full matrices up to d = 600, diagonals beyond
    with pytest.warns(RuntimeWarning, match="only the diagonals"):
        tree = _check_real(model, torch.randn(2, 3, 32, 32), memory_gb=budget, nfm=False)
    assert len(tree.ds.layer) == 21  # 17 convs in blocks and stem, 3 downsamples, fc
    assert "layer2.0.downsample.0" in tree.ds.layer.values
    assert tree["layers/layer1.0.conv2"].ds.agop.shape == (576, 576)
    assert tree["layers/layer4.1.conv2"].ds.agop_diag.shape == (4608,)


def test_torchvision_vgg11_bn_falls_back_to_diagonals_for_the_classifier():
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    with pytest.warns(RuntimeWarning, match="classifier.0"):
        tree = _check_real(model, torch.randn(2, 3, 32, 32), ["features.8", "classifier.0"])
    assert list(tree.ds.matrix_form.values) == ["full", "diagonal"]
    assert tree["layers/classifier.0"].ds.agop_diag.shape == (25088,)
    assert np.isfinite(tree.ds.nfa_corr.sel(layer="features.8"))


def test_torchvision_ops_mlp():
    torch.manual_seed(0)
    model = torchvision.ops.MLP(20, [32, 32, 10], dropout=0.1)
    tree = _check_real(model, torch.randn(8, 20))
    assert list(tree.ds.layer.values) == ["0", "3", "6"]
    assert np.isfinite(tree.ds.nfa_corr.values).all()


def test_timm_resnet18_layer_subset():
    # zero_init_last=False: zero last-BN gains would make every residual branch's AGOP zero.
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False)
    layers = ["conv1", "layer1.0.conv2", "layer2.0.downsample.0", "fc"]
    tree = _check_real(model, torch.randn(2, 3, 32, 32), layers)
    assert list(tree.ds.fan_in.values) == [147, 576, 64, 512]
    assert np.isfinite(tree.ds.nfa_corr.values).all()


def test_timm_convnext_depthwise_and_token_linears():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10, conv_mlp=False)
    layers = ["stem.0", "stages.0.blocks.0.conv_dw", "stages.0.blocks.0.mlp.fc1", "head.fc"]
    tree = _check_real(model, torch.randn(2, 3, 32, 32), layers, agop_outputs="random")
    dw = tree["layers/stages.0.blocks.0.conv_dw"]
    assert dw.attrs["fan_in"] == 40 * 49 and dw.attrs["positions"] == 64
    # Depthwise: the NFM is block-diagonal over channels (49 x 49 blocks).
    nfm = dw.ds.nfm.values
    assert np.count_nonzero(nfm) <= 40 * 49 * 49 and nfm[0, 49] == 0.0
    assert tree["layers/stages.0.blocks.0.mlp.fc1"].attrs["positions"] == 64  # 8 x 8 tokens


# ----------------------------------------------------------------------------- training
def test_nfa_correlation_rises_when_an_mlp_learns_digits(capsys):
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    probe = NeuralProbe(model)
    before = probe.measure((X, y))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for _ in range(2000):
        idx = torch.randint(0, len(X), (32,), generator=g)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    after = probe.measure((X, y))
    curves = stack_curves({0: before.ds, 2000: after.ds}, dim="epoch")
    assert curves.nfa_corr.dims == ("epoch", "layer")
    corr = curves.nfa_corr.sel(layer="0").values
    with capsys.disabled():
        print(
            f"\n[digits MLP, {seconds:.1f} s SGD] first-layer nfa_corr: init {corr[0]:.3f}, "
            f"trained {corr[1]:.3f}; ncc_acc of the head input "
            f"{float(after.ds.ncc_acc[-1, 0]):.3f}"
        )
    assert corr[1] > corr[0] + 0.08
    assert corr[1] > 0.9
    # Training also collapses the last layer's features.
    assert float(after.ds.nc1_trace[-1, 0]) < float(before.ds.nc1_trace[-1, 0]) / 2


# ----------------------------------------------------------------------------- safety
def _state(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [p.grad for p in model.parameters()],
    )


def _assert_state(model, state):
    training, flags, tensors, grads = state
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key]), key  # incl. BatchNorm running stats
    assert all(a is b for a, b in zip((p.grad for p in model.parameters()), grads, strict=True))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _mixed_state_model():
    model = residual_cnn()
    model.train()
    model.conv1.eval()  # mixed modes and flags must come back exactly
    model.stem.weight.requires_grad_(False)
    return model


def test_model_and_inputs_are_left_as_they_were():
    model = nn.Sequential(nn.ReLU(inplace=True), residual_cnn())  # modifies its input in place
    model.train()
    model[1].conv1.eval()
    model[1].stem.weight.requires_grad_(False)
    X = inputs_for(model[1])
    X_before = X.clone()
    state = _state(model)
    NeuralProbe(model).measure((X, labels_for(10)))
    _assert_state(model, state)
    assert torch.equal(X, X_before)


def test_state_restored_after_an_exception_inside_measure():
    model = _mixed_state_model()
    state = _state(model)
    X = inputs_for(model)
    X[7, 0, 0, 0] = float("nan")  # in the second batch: the first batch has run
    batches = [(X[:5], labels_for(5)), (X[5:], labels_for(5))]
    with pytest.raises(ValueError, match="NaN"):
        NeuralProbe(model).measure(batches)
    _assert_state(model, state)

    calls = []

    def explode(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = model.down.register_forward_hook(explode)
    X[7, 0, 0, 0] = 0.0
    with pytest.raises(RuntimeError, match="boom"):
        NeuralProbe(model).measure(batches)  # fails in the first collapse pass
    handle.remove()
    _assert_state(model, state)


def test_context_manager_closes_the_probe():
    model = mlp()
    with NeuralProbe(model, collapse=False) as probe:
        probe.measure((inputs_for(model), labels_for(10)))
    with pytest.raises(RuntimeError, match="closed"):
        probe.measure((inputs_for(model), labels_for(10)))


def test_verbose_logs_and_shows_progress(caplog, capsys):
    model = mlp()
    with caplog.at_level(logging.INFO, logger="deeprfm"):
        NeuralProbe(model, verbose=True).measure((inputs_for(model), labels_for(10)))
    assert "probe: 3 layers, 10 samples" in caplog.text
    assert "probe: gradients" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input
def test_unknown_layer_names_list_the_available_ones():
    with pytest.raises(
        ValueError, match=r"unknown layer\(s\) \['nope'\].*available: \['0', '2', '4'\]"
    ):
        NeuralProbe(mlp(), ["0", "nope"])
    with pytest.raises(ValueError, match="not Linear/Conv2d"):
        NeuralProbe(mlp(), ["1"])
    with pytest.raises(ValueError, match="predicate selected no layer"):
        NeuralProbe(mlp(), lambda name, module: False)
    assert NeuralProbe(mlp(), lambda n, m: m.out_features > 4).layer_names == ["0", "2"]
    assert NeuralProbe(mlp(), "2").layer_names == ["2"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"agop_outputs": "fast"}, ValueError, "agop_outputs"),
        ({"agop_outputs": 0}, ValueError, "agop_outputs"),
        ({"agop_outputs": 2.5}, TypeError, "agop_outputs"),
        ({"agop_outputs": True}, TypeError, "agop_outputs"),
        ({"agop": False, "nfm": False, "collapse": False}, ValueError, "at least one"),
        ({"init_weights": {}}, ValueError, "centered_nfm"),
        (
            {"centered_nfm": True, "init_weights": {"0.weight": torch.zeros(2, 2)}},
            ValueError,
            "shape",
        ),
        ({"centered_nfm": True, "init_weights": {}}, ValueError, "missing key '0.weight'"),
        ({"max_samples": 0}, ValueError, "max_samples"),
        ({"verbose": 1}, TypeError, "verbose"),
        ({"device": "gpu7"}, ValueError, "device"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralProbe(mlp(), **kwargs)


def test_bad_models():
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        NeuralProbe(nn.Sequential(nn.ReLU(), nn.Conv1d(2, 2, 1)))
    with pytest.raises(TypeError, match="model"):
        NeuralProbe(lambda x: x)


def test_bad_data():
    model = mlp()
    X, y = inputs_for(model), labels_for(10)
    probe = NeuralProbe(model)
    with pytest.raises(TypeError, match="one-shot iterator"):
        probe.measure(iter([(X, y)]))
    with pytest.raises(TypeError, match="integer class labels"):
        probe.measure((X, y.double()))
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe.measure((X, torch.zeros(10, dtype=torch.int64)))
    with pytest.raises(ValueError, match="needs labels"):
        probe.measure([X])
    with pytest.raises(ValueError, match="no samples"):
        probe.measure([])
    with pytest.raises(TypeError, match="data"):
        probe.measure(X)
    shuffled = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, y),
        batch_size=3,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    with pytest.raises(ValueError, match="different samples"):
        NeuralProbe(model, max_samples=4).measure(shuffled)
    # Without collapse one pass suffices: iterators and label-free batches are fine.
    NeuralProbe(model, collapse=False).measure(iter([X[:4], X[4:]]))


def test_layers_that_do_not_run_or_run_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.unused, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.shared(self.shared(x)))

    model = Twice()
    data = (torch.randn(6, 4), torch.arange(6) % 2)
    with pytest.raises(ValueError, match="ran more than once"):
        NeuralProbe(model).measure(data)
    with pytest.raises(ValueError, match=r"\['unused'\] did not run"):
        NeuralProbe(model, ["unused", "head"]).measure(data)
    with pytest.warns(RuntimeWarning, match="left out"):
        tree = NeuralProbe(model, lambda n, m: n != "shared").measure(data)
    assert list(tree.ds.layer.values) == ["head"]


# ----------------------------------------------------------------------------- I/O
def test_netcdf_round_trip(tmp_path):
    model = residual_cnn()
    probe = NeuralProbe(model)
    probe.memory_gb = 6 * 8 * 30**2 / 1024**3
    with pytest.warns(RuntimeWarning):
        tree = probe.measure((inputs_for(model, 12), labels_for(12)))
    path = tmp_path / "probe.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    with xr.open_datatree(path, engine="h5netcdf") as back:
        back = back.load()
        assert back.identical(tree)
        assert json.loads(back.attrs["config"])["agop_outputs"] == "exact"
