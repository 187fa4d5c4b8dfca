"""Tests of analysis.nfa (PSD powers and Neural Feature Ansatz correlations)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import nfa_correlation, nfa_correlations, psd_power


def random_psd(d, seed, rank=None):
    a = np.random.default_rng(seed).normal(size=(d, rank or d))
    return a @ a.T


def pearson(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


# ----------------------------------------------------------------------------- psd_power
@pytest.mark.parametrize("power", [0.5, 1.0, 1.5, 0.25])
def test_psd_power_matches_scipy(power):
    m = random_psd(9, seed=0)
    expected = np.real(scipy.linalg.fractional_matrix_power(m, power))
    got = psd_power(m, power)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_psd_power_clamps_negative_eigenvalues_and_keeps_type():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    evals = np.array([-1e-9, -0.5, 0.0, 1.0, 4.0, 9.0])
    m = (q * evals) @ q.T
    t = torch.tensor(m)
    t0 = t.clone()
    root = psd_power(t, 0.5)
    assert isinstance(root, torch.Tensor) and root.dtype == torch.float64
    expected = (q * np.sqrt(np.clip(evals, 0, None))) @ q.T
    np.testing.assert_allclose(root.numpy(), expected, atol=1e-10)
    assert torch.equal(t, t0)
    np.testing.assert_allclose(psd_power(m, 1.0), (q * np.clip(evals, 0, None)) @ q.T, atol=1e-12)


def test_psd_power_bad_input():
    with pytest.raises(ValueError, match=r"matrix.*square"):
        psd_power(np.ones((3, 4)), 0.5)
    with pytest.raises(ValueError, match="power"):
        psd_power(np.eye(3), 0.0)
    with pytest.raises(TypeError, match="power"):
        psd_power(np.eye(3), "half")
    with pytest.raises(ValueError, match=r"matrix.*NaN"):
        psd_power(np.full((2, 2), np.nan), 0.5)


# ----------------------------------------------------------------------------- correlation
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_nfa_correlation_matches_direct_formula(power):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(7, 12))
    nfm = w.T @ w
    agop = random_psd(12, seed=3, rank=5)
    powered = np.real(scipy.linalg.sqrtm(agop)) if power == 0.5 else agop
    got_p = nfa_correlation(nfm, agop, power=power, method="pearson")
    got_c = nfa_correlation(torch.tensor(nfm), torch.tensor(agop), power=power, method="cosine")
    assert isinstance(got_p, float) and isinstance(got_c, float)
    assert got_p == pytest.approx(pearson(nfm, powered), abs=1e-6)
    assert got_c == pytest.approx(cosine(nfm, powered), abs=1e-6)


def test_nfa_holds_exactly_when_nfm_is_agop_root():
    agop = random_psd(10, seed=4)
    nfm = 3.0 * psd_power(agop, 0.5)
    assert nfa_correlation(nfm, agop, power=0.5) == pytest.approx(1.0, abs=1e-12)
    assert nfa_correlation(nfm, agop, power=1.0) < 0.999
    assert nfa_correlation(-nfm, agop, method="cosine") == pytest.approx(-1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), a=st.floats(1e-3, 1e3), b=st.floats(1e-3, 1e3))
def test_nfa_correlation_scale_invariant_and_bounded(seed, a, b):
    nfm, agop = random_psd(6, seed), random_psd(6, seed + 1)
    for method in ("pearson", "cosine"):
        base = nfa_correlation(nfm, agop, method=method)
        assert -1.0 <= base <= 1.0
        scaled = nfa_correlation(a * nfm, b * agop, method=method)
        assert scaled == pytest.approx(base, abs=1e-9)


def test_constant_matrix_gives_nan():
    assert np.isnan(nfa_correlation(np.ones((3, 3)), np.eye(3)))
    assert np.isnan(nfa_correlation(np.zeros((3, 3)), np.eye(3), method="cosine"))


def test_nfa_correlation_bad_input():
    with pytest.raises(ValueError, match=r"agop.*shape"):
        nfa_correlation(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match=r"nfm.*square"):
        nfa_correlation(np.ones(3), np.eye(3))
    with pytest.raises(ValueError, match="method"):
        nfa_correlation(np.eye(3), np.eye(3), method="spearman")
    with pytest.raises(ValueError, match=r"agop.*NaN"):
        nfa_correlation(np.eye(2), np.array([[1.0, np.inf], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="nfm"):
        nfa_correlation(np.eye(2, dtype=complex), np.eye(2))


# ----------------------------------------------------------------------------- batched
def test_nfa_correlations_dataset(tmp_path):
    rng = np.random.default_rng(5)
    sizes = {"fc1": 12, "fc2": 8, "head": 5}
    nfms = {name: (lambda w: w.T @ w)(rng.normal(size=(4, d))) for name, d in sizes.items()}
    agops = {name: torch.tensor(random_psd(d, seed=d)) for name, d in sizes.items()}
    ds = nfa_correlations(nfms, dict(reversed(agops.items())), powers=(1.0, 0.5))
    assert list(ds["layer"].values) == ["fc1", "fc2", "head"]
    assert ds["nfa_pearson"].dims == ("layer", "power")
    np.testing.assert_array_equal(ds["power"].values, [1.0, 0.5])
    for name in sizes:
        for p in (1.0, 0.5):
            for method in ("pearson", "cosine"):
                expected = nfa_correlation(nfms[name], agops[name], power=p, method=method)
                got = float(ds[f"nfa_{method}"].sel(layer=name, power=p))
                assert got == pytest.approx(expected, abs=1e-12)
    assert {"long_name", "definition", "reference"} <= set(ds["nfa_cosine"].attrs)
    assert json.loads(ds.attrs["config"]) == {"num_features": [12, 8, 5]}
    path = tmp_path / "nfa.nc"
    ds.to_netcdf(path, engine="scipy")
    with xr.open_dataset(path, engine="scipy") as back:
        xr.testing.assert_identical(back.load(), ds)

    seq = nfa_correlations(list(nfms.values()), list(agops.values()), powers=0.5, methods="cosine")
    assert list(seq.data_vars) == ["nfa_cosine"] and list(seq["layer"].values) == [0, 1, 2]


def test_nfa_correlations_bad_input():
    m = {"a": np.eye(3), "b": np.eye(2)}
    with pytest.raises(ValueError, match=r"agops.*same layers"):
        nfa_correlations(m, {"a": np.eye(3)})
    with pytest.raises(ValueError, match=r"agops\['b'\].*shape"):
        nfa_correlations(m, {"a": np.eye(3), "b": np.eye(3)})
    with pytest.raises(ValueError, match="powers"):
        nfa_correlations(m, m, powers=(0.5, -1.0))
    with pytest.raises(ValueError, match="methods"):
        nfa_correlations(m, m, methods=("kendall",))
    with pytest.raises(ValueError, match=r"nfms.*at least one"):
        nfa_correlations({}, {})
