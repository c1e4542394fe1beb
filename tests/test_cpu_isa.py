"""The CPU kernels on every instruction-set path this CPU runs (csrc/include/dfa_kernels/cpu_isa.h):
each hand-tiled loop (the narrow outer product, the B generator, the relu epilogue, the output
epilogue) is compiled once per path with its own tile sizes, so each path is tested against the
reference here, forced in-process (`_C.set_cpu_isa`) or by DFA_KERNELS_CPU_ISA. A path this CPU
cannot run is skipped with the reason (CI's CPU decides which run)."""

import subprocess
import sys

import pytest
import torch
from child_process import child_env

import dfa_kernels as dk
from dfa_kernels import ops, reference

pytestmark = pytest.mark.skipif(ops._C is None, reason="the compiled library is not loaded")
torch_ops = torch.ops.dfa_kernels
SEED, DENSITY = 7, 0.3


@pytest.fixture(params=ops.CPU_ISAS)
def isa(request):
    supported = ops.cpu_isas_supported()
    if request.param not in supported:
        pytest.skip(f"this CPU runs {', '.join(supported)}, not {request.param}")
    before = ops.cpu_isa()
    ops._C.set_cpu_isa(request.param)
    yield request.param
    ops._C.set_cpu_isa(before)


def _close(got, want, K):
    atol = 1e-5 * max(K, 1) ** 0.5 * 4
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-5 if got.dtype == torch.float32 else 1e-2)


# rows around every tile height (1, 2, 4 rows), columns around every tile width (16, 32, 64) and
# the 32-column hash words, out_features 1..16 (the narrow kernel) and past it (BLAS)
ROWS = (1, 3, 5, 9)
WIDTHS = (1, 15, 33, 64, 65, 130, 257)
KS = (1, 2, 4, 5, 16, 17, 40)


@pytest.mark.parametrize("distribution", reference.DISTRIBUTIONS)
def test_project_every_path(isa, distribution):
    assert ops.cpu_isa() == isa
    for N in ROWS:
        for K in KS:
            e = torch.randn(N, K)
            for W in WIDTHS:
                want = reference.project(e, SEED, distribution, DENSITY, W, 0.5)
                _close(torch_ops.project(e, SEED, distribution, DENSITY, W, 0.5, None, None), want, K)
                B = torch_ops.feedback_matrix(SEED, distribution, DENSITY, K, W, torch.float32, "cpu")
                _close(torch_ops.project_materialized(e, B, 0.5, None, None), want, K)


def test_output_epilogue_every_path(isa):
    """col_scale and 16-bit outputs (the epilogue loop), on a narrow and a BLAS shape."""
    for N, K, W in ((33, 3, 131), (20, 40, 70)):
        e = torch.randn(N, K)
        cs = torch.rand(W) + 0.5
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            want = (reference.project(e, SEED, "uniform", DENSITY, W, 2.0) * cs).to(out_dtype)
            got = torch_ops.project(e, SEED, "uniform", DENSITY, W, 2.0, cs, out_dtype)
            assert got.dtype == out_dtype
            _close(got, want, K)


def test_project_points_every_path(isa):
    """Points at column offsets off the hash words, relu in fp32 (its own loop) and the other activations."""
    N, K, widths = 37, 6, [5, 64, 33, 130]
    offsets = [0, 7, 71, 104]
    e = torch.randn(N, K)
    for activations in (["relu"] * 4, ["gelu", "tanh", "sigmoid", "silu"]):
        acts = [torch.randn(N, w) for w in widths]
        for B in (None, torch_ops.feedback_matrix(SEED, "rademacher", DENSITY, K, 234, torch.float32, "cpu")):
            got = torch_ops.project_points(
                e, B, SEED, "rademacher", DENSITY, offsets, widths, [1.0, 0.5, 2.0, 1.5], acts, activations, None
            )
            want = reference.project_points(
                e, B, SEED, "rademacher", DENSITY, offsets, widths, [1.0, 0.5, 2.0, 1.5], acts, activations, None
            )
            for g, w in zip(got, want):
                _close(g, w, K)


@pytest.mark.parametrize("distribution", reference.DISTRIBUTIONS)
def test_feedback_matrix_every_path(isa, distribution):
    got = torch_ops.feedback_matrix(SEED, distribution, DENSITY, 9, 301, torch.float32, "cpu")
    want = reference.feedback_matrix(SEED, distribution, 9, 301, DENSITY)
    if distribution == "gaussian":  # libm-free log/cos on the CPU: hash.h's tolerance
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)


def _run(env_isa: str) -> subprocess.CompletedProcess:
    code = (
        "import dfa_kernels as dk; from dfa_kernels import ops; print(ops.cpu_isa()); print(dk.build_info()['cpu_isa'])"
    )
    # child_env: the dfa_kernels this process imported (after `pip install .`, not the checkout's)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(DFA_KERNELS_CPU_ISA=env_isa)
    )


def test_environment_variable_forces_the_path():
    got = _run("baseline")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["baseline", "baseline"]


def test_a_bad_path_is_refused_by_name():
    got = _run("avx9000")
    assert got.returncode != 0
    assert "DFA_KERNELS_CPU_ISA must be one of avx512, avx2, baseline" in got.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "dfa_kernels", "info"],
        capture_output=True,
        text=True,
        env=child_env(DFA_KERNELS_CPU_ISA="avx9000"),
    )
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
    assert "DFA_KERNELS_CPU_ISA must be one of" in cli.stderr


def test_a_path_this_cpu_lacks_is_refused():
    missing = [isa for isa in ops.CPU_ISAS if isa not in ops.cpu_isas_supported()]
    if not missing:
        pytest.skip("this CPU runs every path")
    got = _run(missing[0])
    assert got.returncode != 0 and "this CPU runs at most" in got.stderr


def test_info_names_the_path_and_the_table():
    info = dk.build_info()
    assert info["cpu_isa"] == ops.cpu_isa() and info["cpu_isa_detected"] == ops.cpu_isas_supported()[0]
    slug = ops.device_slug("cpu")
    assert slug == f"cpu_{ops.cpu_isa()}"
    if not ops.backend_table(slug):  # auto on an unmeasured path says so
        assert any(f"no measured backend table for {slug}" in w for w in info["warnings"])
