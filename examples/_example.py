"""What every example script shares: its command line and its output folder."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def example_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with ``--small`` (also ``DEEPRFM_SMALL=1``), ``--out`` and ``--seed``.

    Parameters
    ----------
    doc : str
        The script's module docstring; its first line describes the script.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        default=os.environ.get("DEEPRFM_SMALL", "") not in ("", "0"),
        help="a quick run (also set by the environment variable DEEPRFM_SMALL=1)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def output_dir(out: Path | None, prefix: str) -> Path:
    """The folder ``out`` (created if needed), or a fresh temporary one named ``prefix…``."""
    folder = out or Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
