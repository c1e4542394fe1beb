"""The install files agree with each other (a drift here breaks an install step, not a test)."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_data_extra_pins_the_requirements_file():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    pinned = {
        line.strip()
        for line in (ROOT / "requirements" / "data.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert set(extras["data"]) == pinned
    assert "data" in extras["all"][0] and all(name in extras["all"][0] for name in ("zoo", "bench", "test"))


def test_readme_test_command_installs_the_oracles():
    # tests/test_methods_biotorch.py skips without biotorch: CI must install it, at the pinned version
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.rstrip().endswith("pytest -q"))
    assert "pip install --no-deps -r requirements/oracles.txt" in command
    pins = [
        line.strip()
        for line in (ROOT / "requirements" / "oracles.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert pins == ["biotorch==0.0.16"]


def test_backend_tables_ship_with_the_package():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "backend_tables/*.json" in pyproject["tool"]["setuptools"]["package-data"]["dfa_kernels"]
