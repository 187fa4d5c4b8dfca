"""Tests of analysis.collapse against an independent dense numpy float64 implementation."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import (
    METRICS,
    CollapseAccumulator,
    collapse_curves,
    collapse_metrics,
    stack_curves,
)

BASE = [m for m in METRICS if m not in ("nc3", "nc4")]


# ----------------------------------------------------------------------------- reference
def reference(h, labels, weight=None, bias=None, global_mean="class"):
    """Direct dense formulas of docs/design.md (d x d matrices, explicit pseudo-inverse)."""
    h = np.asarray(h, dtype=np.float64).reshape(len(h), -1)
    classes, y = np.unique(labels, return_inverse=True)
    k, n = len(classes), len(h)
    onehot = np.eye(k)[y]
    counts = onehot.sum(0)
    mu = onehot.T @ h / counts[:, None]
    mu_g = mu.mean(0) if global_mean == "class" else h.mean(0)
    mt = mu - mu_g
    dev = h - mu[y]
    sw = dev.T @ dev / n
    sb = mt.T @ mt / k
    w, v = np.linalg.eigh(sb)
    w, v = w[-(k - 1) :], v[:, -(k - 1) :]
    sb_pinv = (v / w) @ v.T
    out = {
        "nc1": np.trace(sw @ sb_pinv) / k,
        "nc1_trace": np.trace(sw) / np.trace(sb),
        "tr_sw": np.trace(sw),
        "tr_sb": np.trace(sb),
    }
    var = onehot.T @ (dev**2).sum(1) / counts
    ratios = [
        (var[a] + var[b]) / (2 * np.sum((mu[a] - mu[b]) ** 2))
        for a in range(k)
        for b in range(a + 1, k)
    ]
    out["cdnv"] = np.mean(ratios)
    g = mt @ mt.T
    etf = (np.eye(k) - 1 / k) / np.sqrt(k - 1)
    out["nc2"] = np.linalg.norm(g / np.linalg.norm(g) - etf)
    norms = np.linalg.norm(mt, axis=1)
    out["nc2_equinorm"] = norms.std() / norms.mean()
    u = mt / norms[:, None]
    cos = u @ u.T
    out["nc2_equiangle"] = cos[np.triu_indices(k, 1)].std()
    out["nc2_dnc"] = np.mean((cos - k / (k - 1) * (np.eye(k) - 1 / k)) ** 2)
    dist = ((h[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
    ncc = dist.argmin(1)
    out["ncc_acc"] = np.mean(ncc == y)
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float64)
        out["nc3"] = np.sum((weight / np.linalg.norm(weight) - mt / np.linalg.norm(mt)) ** 2)
        logits = h @ weight.T + (0 if bias is None else np.asarray(bias))
        out["nc4"] = np.mean(logits.argmax(1) != ncc)
    return out


def make_data(n=120, d=12, k=4, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
    means = 3.0 * rng.normal(size=(k, d))
    h = means[y] + spread * rng.normal(size=(n, d))
    return h, y


def assert_matches(ds, expected, rtol=1e-9, atol=1e-12):
    for name, value in expected.items():
        np.testing.assert_allclose(float(ds[name]), value, rtol=rtol, atol=atol, err_msg=name)


def random_rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def simplex_etf(k, d, seed):
    etf = np.sqrt(k / (k - 1)) * (np.eye(k) - 1 / k)  # rows: a simplex ETF in R^k
    return np.pad(etf, ((0, 0), (0, d - k))) @ random_rotation(d, seed)


# ----------------------------------------------------------------------------- one-shot
@pytest.mark.parametrize("global_mean", ["class", "sample"])
@pytest.mark.parametrize("kind", ["numpy", "torch32", "conv"])
def test_metrics_match_dense_reference(global_mean, kind):
    h, y = make_data(n=150, d=24, k=5, seed=1, spread=8.0)  # ncc_acc about 0.85
    rng = np.random.default_rng(2)
    weight, bias = rng.normal(size=(5, 24)), rng.normal(size=5)
    expected = reference(h, y, weight, bias, global_mean=global_mean)
    feats = h
    if kind == "torch32":
        feats = torch.tensor(h, dtype=torch.float32)
        expected = reference(feats.double().numpy(), y, weight, bias, global_mean=global_mean)
    elif kind == "conv":
        feats = h.reshape(150, 2, 3, 4)
    ds = collapse_metrics(feats, y, classifier=(weight, bias), global_mean=global_mean)
    assert list(ds.data_vars) == list(METRICS)
    assert all(ds[m].ndim == 0 and ds[m].dtype == np.float64 for m in ds.data_vars)
    assert_matches(ds, expected)
    for m in ds.data_vars:
        assert {"long_name", "definition", "reference"} <= set(ds[m].attrs)
    config = json.loads(ds.attrs["config"])
    assert config == {
        "global_mean": global_mean,
        "num_classes": 5,
        "num_samples": 150,
        "num_features": 24,
    }


def test_any_labels_sorted_classes():
    h, y = make_data(n=60, d=6, k=3, seed=3)
    names = np.array(["cat", "ant", "bee"])[y]  # sorted classes: ant, bee, cat
    w = np.random.default_rng(0).normal(size=(3, 6))
    order = np.array([1, 2, 0])  # class index of ant, bee, cat in y's numbering
    by_name = collapse_metrics(h, names, classifier=w)
    by_index = collapse_metrics(h, np.argsort(order)[y], classifier=w)
    xr.testing.assert_allclose(by_name, by_index)
    assert_matches(by_name, reference(h, names, w))


def test_metrics_subset_and_linear_classifier():
    h, y = make_data(n=80, d=10, k=4, seed=4)
    lin = torch.nn.Linear(10, 4).double()
    ds = collapse_metrics(h, y, classifier=lin, metrics=["nc4", "nc2", "nc3"])
    assert list(ds.data_vars) == ["nc2", "nc3", "nc4"]
    expected = reference(h, y, lin.weight.detach().numpy(), lin.bias.detach().numpy())
    assert_matches(ds, {m: expected[m] for m in ("nc2", "nc3", "nc4")})
    assert list(collapse_metrics(h, y).data_vars) == BASE


def test_inputs_not_modified():
    h, y = make_data(n=50, d=8, k=3, seed=5)
    ht, yt = torch.tensor(h), torch.tensor(y)
    h0, ht0, y0 = h.copy(), ht.clone(), y.copy()
    w = np.ones((3, 8))
    collapse_metrics(h, y, classifier=w)
    collapse_metrics(ht, yt)
    acc = CollapseAccumulator(3, classifier=w)
    acc.update(ht, yt).update_second_pass(ht, yt).result()
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(y, y0)
    assert torch.equal(ht, ht0)
    np.testing.assert_array_equal(w, np.ones((3, 8)))


# ----------------------------------------------------------------------------- invariances
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    global_mean=st.sampled_from(["class", "sample"]),
)
def test_invariances(seed, scale, global_mean):
    h, y = make_data(n=60, d=9, k=4, seed=seed)
    base = collapse_metrics(h, y, global_mean=global_mean)
    q = random_rotation(9, seed + 1)
    shift = np.random.default_rng(seed).normal(size=9) * 10
    rotated = collapse_metrics(h @ q, y, global_mean=global_mean)
    scaled = collapse_metrics(scale * h, y, global_mean=global_mean)
    shifted = collapse_metrics(h + shift, y, global_mean=global_mean)
    for other in (rotated, scaled):
        for m in ("nc1", "nc1_trace", "nc2"):
            np.testing.assert_allclose(float(other[m]), float(base[m]), rtol=1e-8, err_msg=m)
    for m in ("nc1", "nc1_trace", "nc2", "cdnv", "ncc_acc"):
        np.testing.assert_allclose(float(shifted[m]), float(base[m]), rtol=1e-8, err_msg=m)


def test_large_offset_is_numerically_stable():
    """Tiny within-class spread on a huge common offset: shifted accumulation keeps nc1."""
    h, y = make_data(n=200, d=16, k=5, seed=6, spread=1e-4)
    centred = collapse_metrics(h, y)
    offset = collapse_metrics(h + 1e5, y)
    acc = CollapseAccumulator(5, metrics=["nc1", "tr_sw", "cdnv"], max_dense_dim=64)
    for part in np.array_split(np.arange(200), 7):
        acc.update(h[part] + 1e5, y[part])
    dense = acc.result()
    for m in ("nc1", "nc1_trace", "tr_sw", "cdnv"):
        np.testing.assert_allclose(float(offset[m]), float(centred[m]), rtol=1e-5, err_msg=m)
    for m in ("nc1", "tr_sw", "cdnv"):
        np.testing.assert_allclose(float(dense[m]), float(centred[m]), rtol=1e-5, err_msg=m)


# ----------------------------------------------------------------------------- known answers
def test_features_equal_to_class_means():
    rng = np.random.default_rng(7)
    means = rng.normal(size=(5, 11))
    y = np.concatenate([np.arange(5), rng.integers(0, 5, 45)])
    ds = collapse_metrics(means[y], y)
    for m in ("nc1", "nc1_trace", "tr_sw", "cdnv"):
        assert float(ds[m]) == pytest.approx(0.0, abs=1e-12), m
    assert float(ds["ncc_acc"]) == 1.0


@pytest.mark.parametrize("k,d", [(2, 2), (4, 7), (10, 32)])
def test_simplex_etf_means_and_self_dual_classifier(k, d):
    rng = np.random.default_rng(k)
    means = 5.0 * simplex_etf(k, d, seed=d) + rng.normal(size=d)  # shifted ETF
    y = np.concatenate([np.arange(k), rng.integers(0, k, 6 * k)])
    h = means[y] + 1e-3 * rng.normal(size=(len(y), d))
    centred = means - means.mean(0)
    classifier = 0.37 * centred / np.linalg.norm(centred)
    ds = collapse_metrics(means[y], y, classifier=classifier)
    for m in ("nc2", "nc2_dnc", "nc2_equinorm", "nc2_equiangle", "nc3", "nc4"):
        assert float(ds[m]) == pytest.approx(0.0, abs=1e-10), m
    noisy = collapse_metrics(h, y, classifier=classifier)
    assert float(noisy["nc2"]) < 1e-2 and float(noisy["nc2_dnc"]) < 1e-4
    assert 0.0 < float(noisy["nc1"]) < 1e-5


def test_degenerate_features_give_nan_not_zero():
    """All class means equal (a dead layer): nc1 is NaN, not a spurious perfect 0."""
    y = np.repeat(np.arange(3), 4)
    with pytest.warns(RuntimeWarning, match="Sigma_B = 0"):
        ds = collapse_metrics(np.zeros((12, 5)), y)
    assert np.isnan(float(ds["nc1"])) and np.isnan(float(ds["nc1_trace"]))
    assert float(ds["tr_sb"]) == 0.0


def test_singleton_class_uses_population_statistics():
    h, y = make_data(n=40, d=6, k=3, seed=8)
    y = y.copy()
    y[y == 2] = 1
    y[0] = 2  # class 2 has exactly one sample
    ds = collapse_metrics(h, y)
    assert_matches(ds, reference(h, y))
    acc = CollapseAccumulator(3)
    acc.update(h, y).update_second_pass(h, y)
    xr.testing.assert_allclose(acc.result(), ds)


# ----------------------------------------------------------------------------- streaming
def stream(acc, h, y, bounds, to_torch=False):
    parts = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    conv = torch.tensor if to_torch else np.asarray
    for part in parts:
        acc.update(conv(h[part]), conv(y[part]))
    if acc.needs_second_pass:
        for part in reversed(parts):  # any order
            acc.update_second_pass(conv(h[part]), conv(y[part]))
    return acc


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(0, 90), max_size=8),
    global_mean=st.sampled_from(["class", "sample"]),
    dense=st.booleans(),
    to_torch=st.booleans(),
)
def test_streaming_equals_one_shot(cuts, global_mean, dense, to_torch):
    h, y = make_data(n=90, d=14, k=5, seed=9, spread=3.0)
    order = np.argsort(y, kind="stable")  # sorted labels: most batches miss most classes
    h, y = h[order], y[order]
    bounds = [0, *sorted(cuts), 90]  # uneven, possibly empty batches
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(5, 14)), rng.normal(size=5)
    if dense:  # no per-sample metric: nc1 from the d x d scatter, in one pass
        metrics = [m for m in METRICS if m not in ("ncc_acc", "nc4")]
        acc = CollapseAccumulator(5, global_mean=global_mean, metrics=metrics, max_dense_dim=14)
        stream(acc, h, y, bounds, to_torch)
        assert not acc.needs_second_pass
        got = acc.result(classifier=weight)
        want = collapse_metrics(h, y, classifier=weight, global_mean=global_mean, metrics=metrics)
    else:
        acc = CollapseAccumulator(5, classifier=(weight, bias), global_mean=global_mean)
        stream(acc, h, y, bounds, to_torch)
        assert acc.needs_second_pass
        got = acc.result()
        want = collapse_metrics(h, y, classifier=(weight, bias), global_mean=global_mean)
    assert list(got.data_vars) == list(want.data_vars)
    xr.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert_matches(
        got, {m: v for m, v in reference(h, y, weight, bias, global_mean).items() if m in got}
    )


def test_streaming_large_dimension_without_dxd():
    d, k = 20_000, 4
    rng = np.random.default_rng(10)
    y = np.array([0, 1, 2, 3, 1, 1, 0, 3, 3, 2, 0, 1, 2, 2, 0, 3, 1, 0, 2, 3, 1, 0, 1, 2])
    h = (rng.normal(size=(k, d))[y] + 0.3 * rng.normal(size=(len(y), d))).astype(np.float32)
    acc = CollapseAccumulator(k, metrics=["nc1", "nc1_trace", "nc2", "cdnv"])
    bounds = [0, 1, 7, 7, 15, 24]
    acc.update(h[:1], y[:1])
    assert acc.needs_second_pass  # d > max_dense_dim: nc1 via the K x K identity
    for a, b in itertools.pairwise(bounds[1:]):
        acc.update(torch.from_numpy(h[a:b]), torch.from_numpy(y[a:b]))
    for a, b in itertools.pairwise(bounds):
        acc.update_second_pass(h[a:b], y[a:b])
    tensors = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
    tensors += [v for v in acc._second.values()]
    # nothing d x d: class statistics (k x d) and one workspace for the largest batch
    assert max(t.numel() for t in tensors) <= max(k, *np.diff(bounds)) * d
    got = acc.result()
    want = collapse_metrics(h, y, metrics=["nc1", "nc1_trace", "nc2", "cdnv"])
    xr.testing.assert_allclose(got, want, rtol=1e-9)
    # independent check of nc1 with the K x K identity in numpy
    h64 = h.astype(np.float64)
    mu = np.stack([h64[y == c].mean(0) for c in range(k)])
    mt = mu - mu.mean(0)
    p = (h64 - mu[y]) @ mt.T
    g_pinv = np.linalg.pinv(mt @ mt.T, rcond=1e-10, hermitian=True)
    nc1 = np.trace(g_pinv @ g_pinv @ (p.T @ p / len(y)))
    np.testing.assert_allclose(float(got["nc1"]), nc1, rtol=1e-8)


def test_result_with_classifier_gives_nc3():
    h, y = make_data(n=40, d=6, k=3, seed=11)
    w = np.random.default_rng(1).normal(size=(3, 6))
    acc = stream(CollapseAccumulator(3), h, y, [0, 13, 40])
    ds = acc.result(classifier=w)
    assert "nc3" in ds and "nc4" not in ds
    assert float(ds["nc3"]) == pytest.approx(reference(h, y, w)["nc3"], rel=1e-10)
    xr.testing.assert_identical(acc.result(classifier=w), ds)  # result() is repeatable


# ----------------------------------------------------------------------------- bad input
def test_bad_input_one_shot():
    h, y = make_data(n=30, d=4, k=3, seed=12)
    with pytest.raises(ValueError, match=r"labels.*shape"):
        collapse_metrics(h, y[:-1])
    with pytest.raises(ValueError, match=r"labels.*at least 2 classes"):
        collapse_metrics(h, np.zeros(30, dtype=int))
    bad = h.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"features.*NaN"):
        collapse_metrics(bad, y)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"features.*NaN or infinite"):
        collapse_metrics(torch.tensor(bad), y)
    with pytest.raises(ValueError, match=r"features.*shape"):
        collapse_metrics(h[:, 0], y)
    with pytest.raises(TypeError, match="features"):
        collapse_metrics(h.astype(complex), y)
    with pytest.raises(ValueError, match=r"labels.*NaN"):
        collapse_metrics(h, np.where(y == 0, np.nan, y))
    with pytest.raises(ValueError, match=r"classifier.*shape"):
        collapse_metrics(h, y, classifier=np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"classifier.*columns"):
        collapse_metrics(h, y, classifier=np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"classifier.*bias"):
        collapse_metrics(h, y, classifier=(np.ones((3, 4)), np.ones(4)))
    with pytest.raises(ValueError, match=r"metrics.*unknown"):
        collapse_metrics(h, y, metrics=["nc5"])
    with pytest.raises(ValueError, match=r"metrics.*'nc3'"):
        collapse_metrics(h, y, metrics=["nc3"])
    with pytest.raises(ValueError, match="global_mean"):
        collapse_metrics(h, y, global_mean="median")


def test_bad_input_accumulator():
    h, y = make_data(n=30, d=4, k=3, seed=13)
    with pytest.raises(ValueError, match="num_classes"):
        CollapseAccumulator(1)
    with pytest.raises(TypeError, match="num_classes"):
        CollapseAccumulator(3.0)
    with pytest.raises(ValueError, match=r"metrics.*'nc4'.*classifier"):
        CollapseAccumulator(3, metrics=["nc4"])
    acc = CollapseAccumulator(3)
    with pytest.raises(RuntimeError, match="no features"):
        acc.result()
    with pytest.raises(ValueError, match=r"labels.*shape"):
        acc.update(h, y[:5])
    with pytest.raises(TypeError, match=r"labels.*integer"):
        acc.update(h, y.astype(float))
    with pytest.raises(ValueError, match=r"labels.*\[0, 3\)"):
        acc.update(h, y + 1)
    acc.update(h[:10], y[:10])
    with pytest.raises(ValueError, match=r"features.*4 features"):
        acc.update(np.ones((2, 5)), np.zeros(2, dtype=int))
    with pytest.raises(RuntimeError, match=r"second pass.*update_second_pass"):
        acc.result()
    acc.update_second_pass(h[:4], y[:4])
    with pytest.raises(RuntimeError, match="first pass is closed"):
        acc.update(h, y)
    with pytest.raises(ValueError, match="second pass saw"):
        acc.result()
    one_pass = CollapseAccumulator(3, metrics=["nc1_trace"]).update(h, y)
    with pytest.raises(RuntimeError, match="no second pass"):
        one_pass.update_second_pass(h, y)
    missing = CollapseAccumulator(4, metrics=["nc2"]).update(h, y)
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] received no samples"):
        missing.result()
    with_clf = CollapseAccumulator(3, classifier=np.ones((3, 4)), metrics=["nc3"]).update(h, y)
    with pytest.raises(ValueError, match=r"classifier.*only once"):
        with_clf.result(classifier=np.ones((3, 4)))


# ----------------------------------------------------------------------------- curves, netCDF
def test_collapse_curves_and_stacking():
    h, y = make_data(n=60, d=8, k=3, seed=14)
    rng = np.random.default_rng(15)
    layers = {
        "conv1": h.reshape(60, 2, 4),
        "block2": np.maximum(h @ rng.normal(size=(8, 16)), 0),
        "fc": torch.tensor(h @ rng.normal(size=(8, 5))),
    }
    w = rng.normal(size=(3, 5))
    ds = collapse_curves(layers, y, classifiers={"fc": w})
    assert list(ds["layer"].values) == ["conv1", "block2", "fc"]
    assert ds["nc1"].dims == ("layer",)
    for name, feats in layers.items():
        one = collapse_metrics(feats, y, classifier=w if name == "fc" else None)
        for m in one.data_vars:
            np.testing.assert_allclose(float(ds[m].sel(layer=name)), float(one[m]), rtol=1e-12)
    assert np.isnan(ds["nc3"].sel(layer="conv1")) and np.isfinite(ds["nc4"].sel(layer="fc"))
    assert ds["nc1"].attrs["reference"].startswith("Papyan")
    assert json.loads(ds.attrs["config"])["num_features"] == [8, 16, 5]

    seq = collapse_curves(list(layers.values()), y, metrics=["nc1"])
    assert list(seq["layer"].values) == [0, 1, 2] and list(seq.data_vars) == ["nc1"]

    epochs = stack_curves({0: ds, 5: ds, 10: ds}, dim="epoch")
    assert epochs["nc1"].dims == ("epoch", "layer")
    assert list(epochs["epoch"].values) == [0, 5, 10]
    seeds = stack_curves([epochs, epochs], dim="seed")
    assert seeds["nc2"].dims == ("seed", "epoch", "layer")
    assert seeds["nc2"].attrs == ds["nc2"].attrs

    renamed = ds.assign_coords(layer=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"datasets.*layer names"):
        stack_curves([ds, renamed])
    with pytest.raises(ValueError, match=r"dim.*already exists"):
        stack_curves([epochs, epochs], dim="epoch")
    with pytest.raises(ValueError, match=r"features_by_layer.*samples"):
        collapse_curves({"a": h, "b": h[:-1]}, y)
    with pytest.raises(ValueError, match=r"classifiers.*not in"):
        collapse_curves(layers, y, classifiers={"head": w})


@pytest.mark.parametrize("engine", ["h5netcdf", "scipy"])
def test_netcdf_round_trip(tmp_path, engine):
    pytest.importorskip("h5py" if engine == "h5netcdf" else "scipy")
    h, y = make_data(n=40, d=6, k=3, seed=16)
    w = np.random.default_rng(2).normal(size=(3, 6))
    one = collapse_metrics(h, y, classifier=w)
    curves = stack_curves(
        {e: collapse_curves({"in": h, "relu": np.maximum(h, 0)}, y) for e in (1, 2)}, "epoch"
    )
    for i, ds in enumerate((one, curves)):
        path = tmp_path / f"ds{i}.nc"
        ds.to_netcdf(path, engine=engine)
        with xr.open_dataset(path, engine=engine) as back:
            xr.testing.assert_identical(back.load(), ds)
            assert json.loads(back.attrs["config"]) == json.loads(ds.attrs["config"])
