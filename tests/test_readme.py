"""The README's two commands are the contract: CI runs exactly the test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_the_two_commands():
    main_job, tests = _readme_commands()[:2]
    assert main_job.startswith("python -m pip install -e .") and "deeprfm " in main_job
    assert "[dev]" in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    test_command = _readme_commands()[1]
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
