"""The Triton kernels compile for a GPU (sm_90, down to cubin) even here without one: the
interpreter that runs them in the other tests does not catch what only the compiler rejects.
CI compiles every job of scripts/triton_compile_check.py for sm_80 and sm_90 with the installed
Triton, and for sm_90 with the GPU image's Triton 3.6; here, the jobs cover every config."""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile_check.py"


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # one job of each kernel: project, narrow, project_points, grouped_weight_grad, feedback_matrix,
    # the table fill, cross_entropy
    assert "7/7 Triton kernel jobs compiled" in done.stdout, done.stdout


def _load_script():
    spec = importlib.util.spec_from_file_location("triton_compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobs_cover_every_autotune_config_of_every_kernel():
    check = _load_script()
    tuning = importlib.import_module("dfa_kernels.triton.tuning")
    assert set(check.TUNED_VARIANTS) == set(tuning.TUNED)
    for name, tuned in tuning.TUNED.items():
        per_config = []
        for index, config in enumerate(tuned.configs):
            jobs = [j for j in check.JOBS if (j.tuned, j.config) == (name, index)]
            assert jobs, f"{name} config {index} is never compiled"
            for job in jobs:
                assert job.fn is tuned.kernel and job.num_warps == config.num_warps
                assert job.num_stages == config.num_stages
                assert {k: job.constexprs[k] for k in config.kwargs} == config.kwargs
            per_config.append(len(jobs))
        assert per_config[0] == max(per_config), name  # every variant with the first config
    kernels = {
        getattr(module, attr)
        for module in map(
            importlib.import_module,
            (
                "dfa_kernels.triton.project",
                "dfa_kernels.triton.project_points",
                "dfa_kernels.triton.grouped_gemm",
                "dfa_kernels.triton.tables",
                "dfa_kernels.triton.cross_entropy",
            ),
        )
        for attr in vars(module)
        if attr.endswith("_kernel")
    }
    assert len(kernels) == 7 and kernels == {job.fn for job in check.JOBS}
