"""The type check of the core package: mypy, configured in pyproject.toml ([tool.mypy]: the public
API's modules and what they are built on), reports no error; the package ships its py.typed marker,
so users' type checkers read these annotations."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# the core package: the public API (DESIGN.md section 7) and the modules it is built on
CORE = [
    "__init__",
    "nn",
    "ops",
    "feedback",
    "convert",
    "methods",
    "layerwise",
    "autograd",
    "align",
    "reference",
    "lm_head",
    "provenance",
]
needs_mypy = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (the test extra installs it: pip install '.[test]')",
)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_mypy_checks_the_core_package():
    assert sorted(_pyproject()["tool"]["mypy"]["files"]) == sorted(f"dfa_kernels/{m}.py" for m in CORE)


@needs_mypy
def test_mypy_is_clean_on_the_core_package():
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"mypy (config: pyproject.toml [tool.mypy]) found errors:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout


# DESIGN.md section 7 as a user writes it; its last line is a misuse that the annotations must catch
USAGE = """
import torch
from torch import nn

import dfa_kernels as dk

spec = dk.FeedbackSpec(out_features=10, widths=[256, 256, 128], seed=0, distribution="uniform")
D: int = spec.total_width
B: torch.Tensor = spec.matrix(dtype=torch.float32, device="cpu")
F: torch.Tensor = dk.project(torch.randn(4, 10), spec, storage="virtual", backend="auto")
backends: list[str] = dk.available_backends("cpu")
built: dict = dk.build_info()
dfa = dk.DFA(mode="dfa", seed=0, layout="independent", scale="auto", storage="auto", error_dtype="auto")
tiny: dk.DFA = dk.DFA.tinydfa()
h: torch.Tensor = dfa.point(torch.randn(4, 8), activation="relu")
head = nn.Linear(8, 8)
h = dfa.linear(h, head, activation="gelu")
loss: torch.Tensor = dfa.linear_cross_entropy(h, head, torch.zeros(4, dtype=torch.long))
matrices: list[torch.Tensor] = dfa.feedback_matrices()
with dfa.capture() as cap:
    signals = cap.signals
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
converted: dk.DFAModel = dk.convert(model, mode="dfa", points=["1"])
converted = dk.convert(model, mode="fa", points=nn.ReLU, layers=(nn.Linear, nn.Conv2d))
converted = dk.convert(model, points=lambda name, module: isinstance(module, nn.ReLU), fuse=True)
measured: dict = dk.alignment(converted, lambda m, batch: m(batch).sum(), torch.randn(2, 4))
dropped: int = dk.clear_matrix_cache()
modes: tuple[str, ...] = dk.MODES
signal: str = dk.METHODS["sdfa"].signal
layers = [dk.FeedbackLinear(4, 4, mode="usf"), dk.FeedbackConv2d(3, 8, 3, padding="same", mode="frsf")]
dk.DFA(scale=[0.5])
"""


@needs_mypy
def test_the_documented_usage_type_checks(tmp_path):
    """The annotations accept the API as DESIGN.md shows it, and reject a wrong argument type."""
    usage = tmp_path / "usage.py"
    usage.write_text(USAGE)
    misuse = len(USAGE.splitlines())  # the last line's number
    done = subprocess.run(
        [sys.executable, "-m", "mypy", str(usage)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )  # from the checkout: mypy finds dfa_kernels there, with pyproject's config
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and f'usage.py:{misuse}: error: Argument "scale" to "DFA"' in errors[0], done.stdout


def test_the_package_ships_its_py_typed_marker():
    assert (ROOT / "dfa_kernels" / "py.typed").is_file()
    # package data goes into the wheel, and into the sdist with it (MANIFEST.in excludes no such file)
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["dfa_kernels"]
