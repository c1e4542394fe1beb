"""Every fallback is visible: a compiled library that fails to load, a GPU the CUDA kernels were
not compiled for, a cuBLAS without the grouped GEMM. Each says why and how to fix it, at import or
first use and in ``dfa-kernels info``."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfa_kernels as dk
from dfa_kernels import ops

ROOT = Path(__file__).resolve().parents[1]
# Importing dfa_kernels with its compiled library hidden (an entry of None makes the import fail).
HIDE = "import sys; sys.modules['dfa_kernels._C'] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_missing_compiled_library_warns_once_at_import():
    done = _run(
        HIDE + "import dfa_kernels as dk\nimport dfa_kernels.ops, dfa_kernels.nn\n"
        "print(dk.available_backends('cpu'))\n"
        "import torch\nspec = dk.FeedbackSpec(3, [5])\n"
        "print(dk.project(torch.randn(2, 3), spec).shape)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("RuntimeWarning: dfa_kernels: the compiled library dfa_kernels._C failed to load") == 1
    assert "Fix: rebuild it against this torch" in done.stderr and "pip install --no-build-isolation" in done.stderr
    assert "['torch']" in done.stdout and "torch.Size([2, 5])" in done.stdout  # the torch backend still runs


def test_info_shows_the_fallback():
    done = _run(
        HIDE + "import warnings; warnings.simplefilter('ignore')\nfrom dfa_kernels.cli import main; main(['info'])\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.split() == ["extension_loaded", "False"] for line in lines)
    warning = [line for line in lines if line.startswith("WARNING: ")]
    assert len(warning) == 1 and "failed to load" in warning[0] and "Fix:" in warning[0]


def test_info_json_lists_no_warning_when_all_is_well():
    info = dk.build_info()
    assert info["extension_loaded"] and info["warnings"] == []


def _default_archs() -> str:
    """setup.py's DEFAULT_CUDA_ARCHS (read without running setup.py)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "DEFAULT_CUDA_ARCHS":
            return node.value.value
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCHS")


def test_default_arch_list_carries_ptx_for_newer_gpus():
    archs = _default_archs().split(";")
    assert archs[-1].endswith("+PTX")
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):  # A100 .. H200, B200, RTX 50xx
        assert ops.cuda_arch_problem(capability, archs) is None, capability
    problem = ops.cuda_arch_problem((7, 5), archs)  # T4: older than every target
    assert "compute capability 7.5" in problem and 'TORCH_CUDA_ARCH_LIST="7.5"' in problem


@pytest.mark.parametrize(
    "capability,archs,runs",
    [
        ((9, 0), ["8.0"], False),  # sm_80 cubins do not run on sm_90 (another major), no PTX
        ((8, 6), ["8.0"], True),  # same major, newer minor
        ((8, 0), ["8.6"], False),  # same major, older minor
        ((9, 0), ["9.0a"], True),  # arch-specific: that exact GPU only
        ((10, 0), ["9.0a"], False),
        ((10, 0), ["8.0+PTX"], True),  # PTX: any newer GPU
        ((7, 5), ["8.0+PTX"], False),
    ],
)
def test_cuda_arch_problem(capability, archs, runs):
    assert (ops.cuda_arch_problem(capability, archs) is None) == runs


def test_cuda_backend_refused_with_the_arch_reason(monkeypatch):
    """On a GPU the kernels were not compiled for, 'cuda' is not offered and asking for it says why
    (simulated: no GPU needed)."""
    if ops._C is None or not ops._C.build_config()["cuda_compiled"]:
        pytest.skip("built without the CUDA kernels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_cuda_arch_check", lambda index: ops.cuda_arch_problem((7, 5), ["8.0", "9.0+PTX"]))
    monkeypatch.setattr(ops, "_triton_available", lambda device_type: False)
    assert "cuda" not in ops.available_backends("cuda:0")
    with pytest.raises(
        RuntimeError,
        match=r"backend 'cuda' is not available on device cuda:0 \(the CUDA kernels "
        r"were compiled for 8.0, 9.0\+PTX .*compute capability 7.5",
    ):
        ops.resolve_backend("cuda", "cuda:0")


def test_grouped_gemm_found_at_run_time():
    """The grouped cuBLAS GEMM is looked up in the cuBLAS loaded at run time (torch loads it, so
    this runs without a GPU); what it found is in build_info."""
    if ops._C is None or not ops._C.build_config()["cuda_compiled"]:
        pytest.skip("built without the CUDA kernels")
    status = ops._C.runtime_info()["grouped_gemm"]
    assert status.startswith(("available (cuBLAS ", "unavailable: cuBLAS ")), status
    assert dk.build_info()["grouped_gemm"] == status
