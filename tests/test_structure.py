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
