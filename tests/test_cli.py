"""The deeprfm command: every sub-command on tiny data, through a real subprocess."""

import json
import os
import subprocess
import sys

import pytest
import xarray as xr


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deeprfm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_help_everywhere():
    for args in ([], ["rfm"], ["collapse"], ["probe"], ["plot"]):
        result = run(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: deeprfm" in result.stdout


def test_rfm_prints_a_table_and_writes_history(tmp_path):
    out = tmp_path / "history.nc"
    result = run(
        "rfm", "--dataset", "digits", "--iters", "2", "--n-train", "300", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["iteration", "train"])
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    assert all(0.5 < float(row[2]) <= 1 for row in rows)  # test accuracy
    with xr.open_dataset(out) as history:
        assert history.sizes["iteration"] == 3 and "test_acc" in history


def test_collapse_table_netcdf_and_plot_then_plot_command(tmp_path):
    out, png = tmp_path / "collapse.nc", tmp_path / "collapse.png"
    result = run(
        "collapse", "--layers", "2", "--width", "64", "--n-train", "300",
        "--out", str(out), "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "layer  train acc  test acc" in result.stdout
    with xr.open_dataset(out) as collapse:
        assert collapse.sizes == {"layer": 2, "stage": 3}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    result = run("plot", str(out), "--out", str(again), "--metrics", "nc1_trace", "cdnv")
    assert result.returncode == 0, result.stderr
    assert again.exists()


def test_collapse_passes_row_normalisation_and_targets(tmp_path):
    out = tmp_path / "collapse.nc"
    result = run(
        "collapse", "--layers", "2", "--width", "32", "--n-train", "200",
        "--normalize-rows", "none", "--targets", "pm1", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with xr.open_dataset(out) as collapse:
        params = json.loads(collapse.attrs["params"])
    assert params["normalize_rows"] is None and params["layer__targets"] == "pm1"


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_probe_loads_a_state_dict_measures_and_writes_a_datatree(source, tmp_path):
    torch = pytest.importorskip("torch")
    if source == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    else:
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.resnet18(num_classes=10)
    weights, out = tmp_path / "weights.pt", tmp_path / "probe.nc"
    torch.save(model.state_dict(), weights)
    result = run(
        "probe", "--arch", "resnet18", "--source", source, "--weights", str(weights),
        "--n", "40", "--layers", "conv1", "fc", "--agop-outputs", "4", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert any(line.split()[:2] == ["conv1", "Conv2d"] for line in table)
    assert any(line.split()[:2] == ["fc", "Linear"] for line in table)
    with xr.open_datatree(out, engine="h5netcdf") as tree:
        assert list(tree.ds.layer.values) == ["conv1", "fc"]
        assert tree["layers/fc"].ds.agop.shape == (512, 512)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rfm", "--bandwidth", "-1"], "bandwidth"),
        (["rfm", "--dataset", "imagenet"], "invalid choice"),
        (["rfm", "--dataset", "cifar10", "--root", "/nonexistent"], "cifar-10-batches-py"),
        (["rfm", "--iters", "many"], "invalid int value"),
        (["collapse", "--layers", "0"], "layers"),
        (["plot", "/nonexistent.nc", "--out", "x.png"], "nonexistent"),
        (["frobnicate"], "invalid choice"),
        (["probe", "--arch", "resnet1000"], "not a torchvision model"),
        (["probe", "--arch", "resnet1000", "--source", "timm"], "not a timm model"),
        (["probe", "--arch", "resnet18", "--agop-outputs", "some"], "agop-outputs"),
        (["probe", "--arch", "resnet18", "--layers", "nope"], "nope"),
        (["rfm", "--n-train", "3"], "the training subset holds 3 of the 10 classes"),
        (["rfm", "--out", "/proc/x.nc"], "--out /proc/x.nc cannot be written"),
        (["rfm", "--out", "missing/x.nc"], "the folder missing does not exist"),
        (["collapse", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message, tmp_path):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    out = tmp_path / "history.nc"
    out.write_bytes(b"precious")
    result = run("rfm", "--iters", "0", "--n-train", "100", "--out", str(out))
    assert result.returncode == 2 and "exists; pass --overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    result = run("rfm", "--iters", "0", "--n-train", "100", "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    with xr.open_dataset(out) as history:
        assert history.sizes["iteration"] == 1


@pytest.mark.skipif(
    pytest.importorskip("torch").cuda.is_available(), reason="this machine has a GPU"
)
def test_cuda_without_a_gpu_is_one_line():
    result = run("collapse", "--device", "cuda", "--layers", "1")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "deeprfm collapse: error: --device cuda: no CUDA device is available"
    )


def test_refused_weights_and_a_bad_plot_stage_are_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = tmp_path / "weights.pt"
    torch.save({"fc.weight": Payload()}, weights)
    result = run("probe", "--arch", "resnet18", "--weights", str(weights), "--n", "20")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a state-dict file that loads without running code" in result.stderr
    assert not marker.exists()
    data = tmp_path / "curves.nc"
    xr.Dataset(
        {"nc1": (("layer", "stage"), [[1.0], [0.5]])}, coords={"stage": ["input"]}
    ).to_netcdf(data)
    result = run("plot", str(data), "--out", str(tmp_path / "p.png"), "--stage", "bogus")
    assert result.returncode == 2
    assert "--stage 'bogus'" in result.stderr and "['input']" in result.stderr
