"""Tests of analysis.plots: figures render to PNG with the Agg backend, nothing is shown."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis import collapse_curves, plot_collapse, plot_matrix, stack_curves  # noqa: E402


@pytest.fixture(autouse=True)
def _no_show_and_close(monkeypatch):
    def show(*args, **kwargs):
        raise AssertionError("plt.show() must not be called")

    monkeypatch.setattr(plt, "show", show)
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def curves():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    h = rng.normal(size=(3, 6))[y] + 0.5 * rng.normal(size=(30, 6))
    layers = {"input": h, "hidden": np.tanh(h), "output": 2 * h}
    return collapse_curves(layers, y)


def test_import_is_lazy_and_independent_of_deeprfm():
    code = (
        "import sys, analysis; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'; "
        "assert 'deeprfm' not in sys.modules, 'analysis imports deeprfm'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_collapse_single_run(tmp_path, curves):
    ax = plot_collapse(curves)
    assert ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["input", "hidden", "output"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), curves["nc1"].values)
    ax.figure.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_plot_collapse_one_line_per_epoch_and_seed(tmp_path, curves):
    epochs = stack_curves({e: curves * (1 + e) for e in (0, 1, 2)}, dim="epoch")
    fig, axes = plt.subplots(1, 2)
    ax = plot_collapse(epochs, metrics=["nc1_trace"], ax=axes[1])
    assert ax is axes[1]
    assert len(ax.get_lines()) == 3
    assert len(ax.get_legend().get_texts()) == 3
    np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), 3 * curves["nc1_trace"].values)

    seeds = stack_curves([epochs, epochs], dim="seed")
    ax = plot_collapse(seeds, metrics=("nc1", "nc2", "cdnv"), ax=axes[0])
    assert len(ax.get_lines()) == 3 * 2 * 3
    fig.savefig(tmp_path / "runs.png")
    assert (tmp_path / "runs.png").stat().st_size > 1000


def test_plot_collapse_many_epochs_uses_colorbar(tmp_path, curves):
    many = stack_curves({e: curves for e in range(20)}, dim="epoch")
    ax = plot_collapse(many, metrics=["nc1"])
    assert len(ax.get_lines()) == 20
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["nc1"]
    assert len(ax.figure.axes) == 2  # the colorbar
    ax.figure.savefig(tmp_path / "many.png")


def test_plot_collapse_bad_input(curves):
    with pytest.raises(ValueError, match=r"metrics.*\['nc7'\]"):
        plot_collapse(curves, metrics=["nc1", "nc7"])
    with pytest.raises(ValueError, match="layer"):
        plot_collapse(xr.Dataset({"nc1": 0.1}), metrics=["nc1"])
    with pytest.raises(TypeError, match="ds"):
        plot_collapse(curves["nc1"])


@pytest.mark.parametrize("matrix", [np.eye(4) - 0.5, torch.randn(5, 3)])
def test_plot_matrix(tmp_path, matrix):
    ax = plot_matrix(matrix, title="AGOP")
    image = ax.get_images()[0]
    assert image.get_array().shape == tuple(matrix.shape)
    vmin, vmax = image.get_clim()
    assert vmin == -vmax == -float(np.abs(np.asarray(matrix)).max())
    assert ax.get_title() == "AGOP"
    ax.figure.savefig(tmp_path / "matrix.png")
    assert (tmp_path / "matrix.png").stat().st_size > 500


def test_plot_matrix_bad_input():
    with pytest.raises(ValueError, match=r"matrix.*2-D"):
        plot_matrix(np.ones(3))
    with pytest.raises(TypeError, match="matrix"):
        plot_matrix(np.array([["a", "b"]]))
