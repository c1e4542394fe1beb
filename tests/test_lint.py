"""The lint gate: ruff, configured in pyproject.toml ([tool.ruff]), finds nothing to report and
nothing to reformat in the whole tree (the package, tests, benchmarks, scripts)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_ruff = pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None,
    reason="ruff is not installed (the test extra installs it: pip install '.[test]')",
)


@needs_ruff
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"ruff {' '.join(command)} (fix: ruff check --fix . && ruff format .):\n{done.stdout}"
