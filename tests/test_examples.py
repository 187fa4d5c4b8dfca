"""The examples run: every script in ``examples/`` and the notebook, in small mode.

Scripts are found by glob, so a new example is covered as soon as it exists. Each runs as a real
subprocess with ``DEEPRFM_SMALL=1`` and ``--out``; the notebook runs in a Jupyter kernel of this
interpreter through nbclient.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
NOTEBOOK = EXAMPLES / "collapse_curves.ipynb"
#: Files a script must write under ``--out``; a script not listed must write at least one.
EXPECTED_FILES = {
    "rfm_digits_grid_search.py": {"history.nc", "m_diagonal.png"},
    "deep_rfm_collapse.py": {"collapse.nc", "collapse_curves.png"},
    "eigenpro_large_n.py": {"results.csv", "rfm_history.nc"},
    "probe_training.py": {"collapse_curves.nc", "probe_final.nc", "collapse_curves.png"},
    "reproduce_dnc.py": {"deep_rfm_collapse.nc", "mlp_stages.nc", "tables.md"},
    "hyperbf_vs_rfm.py": {"results.csv", "correlations.csv", "metrics.nc"},
    "grokking_modular.py": {"history.nc", "grokking_curve.png", "agop_blocks.png"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_the_documented_scripts_exist():
    assert set(EXPECTED_FILES) <= {script.name for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_explains_itself(script: Path):
    docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8")))
    assert docstring, f"{script.name} has no module docstring"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_runs_in_small_mode(script: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(out)],
        env=os.environ | {"DEEPRFM_SMALL": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    assert str(out) in result.stdout, "the script should say where its files went"
    written = {path.name for path in out.iterdir()} if out.is_dir() else set()
    expected = EXPECTED_FILES.get(script.name)
    if expected is None:
        assert written, f"{script.name} wrote nothing under --out"
    else:
        assert expected <= written, f"{script.name} wrote {sorted(written)}"
    for path in out.iterdir():
        assert path.stat().st_size > 0, f"{path.name} is empty"
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
        elif path.suffix == ".nc":
            with xr.open_dataset(path) as ds:
                assert ds.data_vars, f"{path.name} holds no variables"


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_runs_in_small_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("DEEPRFM_SMALL", "1")  # inherited by the kernel process
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A last cell reporting the kernel's environment: it must be this interpreter's.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) >= 2, "the notebook should draw the Deep RFM and the MLP curves"
    assert nb.cells[-1].outputs[0].text.strip() == sys.prefix
