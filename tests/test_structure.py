"""The package structure the design promises: analysis never imports deeprfm."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_analysis_imports_nothing_from_deeprfm():
    for path in sorted((ROOT / "analysis").rglob("*.py")):
        offending = {name for name in _imported_modules(path) if name.split(".")[0] == "deeprfm"}
        assert not offending, f"{path.name} imports {sorted(offending)}"


def test_only_the_probes_package_reaches_into_its_modules():
    for path in sorted((ROOT / "deeprfm").rglob("*.py")):
        if "probes" in path.relative_to(ROOT / "deeprfm").parts:
            continue
        inside = {name for name in _imported_modules(path) if name.startswith("deeprfm.probes.")}
        assert not inside, f"{path.name} imports {sorted(inside)}; use deeprfm.probes"
