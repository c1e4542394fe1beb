"""The Triton backend (dfa_kernels.triton) against the plain-PyTorch reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is imported). The interpreter rounds fp32 -> bf16 by truncation
and computes bf16 tl.dot wrongly, so bf16 is only tested on a GPU. Shapes are chosen so that every
size of interest appears without running the full product (the interpreter is slow per operation).
"""

import ast
import contextlib
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from dfa_kernels import triton as dkt  # noqa: E402
from dfa_kernels.triton import cross_entropy, grouped_gemm, tables, tuning  # noqa: E402

# the package exports functions named like these modules
project_mod = importlib.import_module("dfa_kernels.triton.project")
points_mod = importlib.import_module("dfa_kernels.triton.project_points")

try:
    from dfa_kernels import reference
except ImportError:  # the package __init__ is not importable: load reference.py on its own
    _spec = importlib.util.spec_from_file_location(
        "dfa_reference", Path(__file__).resolve().parents[1] / "dfa_kernels" / "reference.py"
    )
    reference = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(reference)

if dkt.is_available("cuda"):
    DEVICE = "cuda"
elif dkt.is_available("cpu"):
    DEVICE = "cpu"
else:
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

DISTRIBUTIONS = ("uniform", "gaussian", "rademacher", "sparse")
EXACT = ("uniform", "rademacher", "sparse")  # integer-derived values: bit-identical everywhere
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SEEDS = [0, 1, 42, 2**32 - 1]


def assert_gaussian_close(got, want):
    """hash.h's contract for gaussian entries: |diff| <= 1e-5 * (1 + |z|)."""
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.all((got - want).abs() <= 1e-5 * (1 + want.abs())), (got - want).abs().max()


def assert_matrix(got, want, distribution):
    assert got.shape == want.shape and got.dtype == want.dtype
    if distribution in EXACT:
        assert torch.equal(got.cpu(), want.cpu())
    elif got.dtype == torch.float32:
        assert_gaussian_close(got, want)
    else:  # a gaussian entry within 1e-5 of a 16-bit rounding boundary may round either way
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=torch.finfo(got.dtype).eps, atol=1e-5)


def assert_projection(got, want, K, in_dtype, scale=1.0, col_scale=None):
    """Tolerances relative to the output's scale, sqrt(K) * |scale| * max|col_scale| (e ~ N(0, 1),
    |B| ~ 1): 1e-4 in fp32; 1e-2 when B or the output is rounded to fp16; 2e-2 for bf16."""
    assert got.shape == want.shape and got.dtype == want.dtype and got.device.type == DEVICE
    mag = math.sqrt(max(K, 1)) * abs(scale) * (1.0 if col_scale is None else col_scale.abs().max().item())
    dtypes = {in_dtype, got.dtype}
    tol = 2e-2 if torch.bfloat16 in dtypes else 1e-2 if torch.float16 in dtypes else 1e-4
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol * mag, rtol=tol)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------- feedback_matrix
# (rows, cols, col_offset): single entries, tiles with ragged edges, offsets that start and end
# inside a 32-column rademacher word, and a column index past 2^20.
MATRIX_SHAPES = [(1, 1, 0), (33, 100, 0), (17, 33, 31), (5, 70, 1_000_003), (100, 1, 63)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_feedback_matrix_matches_reference(distribution, seed):
    for rows, cols, offset in MATRIX_SHAPES:
        got = dkt.feedback_matrix(seed, distribution, 0.3, rows, cols, torch.float32, DEVICE, col_offset=offset)
        want = reference.feedback_matrix(seed, distribution, rows, cols, 0.3, col_offset=offset)
        assert_matrix(got, want, distribution)


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_feedback_matrix_low_precision_is_the_rounded_fp32_matrix(distribution, dtype):
    got = dkt.feedback_matrix(5, distribution, 0.1, 40, 90, dtype, DEVICE)
    want = dkt.feedback_matrix(5, distribution, 0.1, 40, 90, torch.float32, DEVICE).to(dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("density", [0.0, 1e-7, 0.1, 0.5, 1.0])
def test_feedback_matrix_sparse_density(density):
    got = dkt.feedback_matrix(9, "sparse", density, 64, 256, torch.float32, DEVICE)
    assert torch.equal(got.cpu(), reference.feedback_matrix(9, "sparse", 64, 256, density))
    assert abs((got != 0).float().mean().item() - density) < 0.02


# hash.h's published vectors that fit a small matrix: (seed, i, j, uniform, rademacher, gaussian).
VECTORS = [
    (0, 0, 0, 0.7378687858581543, -1.0, -0.299004),
    (0, 0, 1, -0.5789018869400024, 1.0, 1.689729),
    (0, 1, 0, 0.07688891887664795, -1.0, 0.936689),
    (1, 0, 0, 0.29652273654937744, 1.0, 0.145733),
    (42, 3, 17, -0.2195887565612793, -1.0, 0.303055),
    (4294967295, 7, 1000000, 0.08305060863494873, -1.0, -0.573929),
]


@pytest.mark.parametrize("seed,i,j,u,r,g", VECTORS)
def test_feedback_matrix_published_vectors(seed, i, j, u, r, g):
    def entry(distribution):
        return dkt.feedback_matrix(seed, distribution, 0.1, i + 1, 1, torch.float32, DEVICE, col_offset=j)[i, 0].item()

    assert entry("uniform") == u
    assert entry("rademacher") == r
    assert entry("gaussian") == pytest.approx(g, abs=1e-5)


def test_feedback_matrix_empty():
    assert dkt.feedback_matrix(0, "uniform", 0.1, 0, 5, torch.float32, DEVICE).shape == (0, 5)
    assert dkt.feedback_matrix(0, "uniform", 0.1, 5, 0, torch.float16, DEVICE).shape == (5, 0)


# ------------------------------------------------------------------------------- project
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_project_identity_gives_the_matrix(distribution, dtype):
    """e = I makes F = B rounded to e's dtype: the in-register B tiles (including rademacher's
    bit-expanded words across tile and word edges) are the reference's, bit for bit. On a GPU,
    fp32 products are 3xTF32, which carries a uniform entry's 24 bits to ~1e-7 only."""
    K, W = 33, 100
    got = dkt.project(torch.eye(K, dtype=dtype, device=DEVICE), 11, distribution, 0.2, W)
    want = reference.feedback_matrix(11, distribution, K, W, 0.2, dtype=dtype)
    if DEVICE == "cuda" and dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=1e-6)
    else:
        assert_matrix(got, want, distribution)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_project_all_distributions(distribution, dtype):
    N, K, W, seed = 7, 10, 100, 2**32 - 1
    e = randn(N, K, dtype=dtype)
    got = dkt.project(e, seed, distribution, 0.25, W)
    assert_projection(got, reference.project(e.cpu(), seed, distribution, 0.25, W), K, dtype)


# (N, K, W, distribution, dtype, scale, with col_scale, out_dtype): every N in {1, 7, 1000},
# K in {1, 3, 10, 50257} (the narrow kernel up to K = 16, the tiled GEMM above) and W in
# {1, 17, 128, 4096}, with large sizes only next to small ones.
PROJECT_CASES = [
    (33, 17, 100, "uniform", torch.float32, 1.0, True, None),
    (7, 40, 65, "rademacher", torch.float16, 0.5, False, torch.float32),
    (1, 1, 1, "uniform", torch.float32, 1.0, False, None),
    (7, 3, 17, "gaussian", torch.float32, 0.5, True, None),
    (7, 10, 128, "rademacher", torch.float16, 1.0, False, None),
    (1000, 10, 128, "sparse", torch.float32, 1.0, True, torch.float16),
    (1000, 3, 17, "rademacher", torch.float32, -2.0, False, None),
    (1000, 1, 1, "gaussian", torch.float16, 1.0, False, torch.float32),
    (1, 50257, 17, "rademacher", torch.float16, 0.01, True, None),
    (3, 10, 4096, "gaussian", torch.float16, 1.0, True, None),
    (7, 1, 4096, "sparse", torch.float32, 3.0, False, torch.float16),
    (1, 3, 4096, "uniform", torch.float32, 1.0, True, None),
]


@pytest.mark.parametrize("N,K,W,distribution,dtype,scale,has_cs,out_dtype", PROJECT_CASES)
def test_project_matches_reference(N, K, W, distribution, dtype, scale, has_cs, out_dtype):
    e = randn(N, K, dtype=dtype)
    cs = torch.rand(W, device=DEVICE) + 0.5 if has_cs else None
    got = dkt.project(e, 1234, distribution, 0.1, W, scale, cs, out_dtype)
    want = reference.project(e.cpu(), 1234, distribution, 0.1, W, scale, None if cs is None else cs.cpu(), out_dtype)
    assert got.dtype == (out_dtype or dtype)
    assert_projection(got, want, K, dtype, scale, cs)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 and large shapes: GPU only")
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_project_bf16_large_cuda(distribution):
    e = randn(4096, 1000, dtype=torch.bfloat16)
    cs = torch.rand(1536, device=DEVICE) + 0.5
    got = dkt.project(e, 3, distribution, 0.1, 1536, 0.1, cs)
    want = reference.project(e, 3, distribution, 0.1, 1536, 0.1, cs)
    assert_projection(got, want, 1000, torch.bfloat16, 0.1, cs)


# ------------------------------------------------------------------ project_materialized
# (N, K, W, e dtype, B dtype, transposed B storage, scale, with col_scale, out_dtype)
MATERIALIZED_CASES = [
    (7, 10, 17, torch.float32, torch.float32, False, 1.0, False, None),
    (9, 20, 70, torch.float32, torch.float16, True, 1.0, True, None),
    (1000, 3, 128, torch.float16, torch.float16, False, 0.5, True, None),
    (7, 10, 17, torch.float32, torch.float32, True, 1.0, True, torch.float16),
    (1, 50257, 17, torch.float32, torch.float32, False, 1.0, False, None),
    (3, 10, 4096, torch.float16, torch.float32, False, 2.0, False, torch.float32),
    (1000, 1, 1, torch.float32, torch.float16, False, 1.0, True, None),
] + (
    [
        (64, 300, 200, torch.bfloat16, torch.float32, False, 1.0, True, None),
        (64, 300, 200, torch.float32, torch.bfloat16, True, 1.0, False, torch.bfloat16),
    ]
    if DEVICE == "cuda"
    else []
)


@pytest.mark.parametrize("N,K,W,dtype,b_dtype,transposed,scale,has_cs,out_dtype", MATERIALIZED_CASES)
def test_project_materialized_matches_reference(N, K, W, dtype, b_dtype, transposed, scale, has_cs, out_dtype):
    e = randn(N, K, dtype=dtype)
    B = randn(W, K, dtype=b_dtype).T if transposed else randn(K, W, dtype=b_dtype)  # strided or contiguous
    cs = torch.rand(W, device=DEVICE) + 0.5 if has_cs else None
    got = dkt.project_materialized(e, B, scale, cs, out_dtype)
    want = reference.project_materialized(e.cpu(), B.cpu(), scale, None if cs is None else cs.cpu(), out_dtype)
    assert got.dtype == (out_dtype or dtype)
    assert_projection(got, want, K, dtype, scale, cs)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_virtual_and_materialized_agree(distribution):
    e = randn(50, 70)
    B = dkt.feedback_matrix(8, distribution, 0.1, 70, 45, torch.float32, DEVICE)
    torch.testing.assert_close(
        dkt.project(e, 8, distribution, 0.1, 45), dkt.project_materialized(e, B), atol=1e-4 * math.sqrt(70), rtol=1e-4
    )


# ------------------------------------------------------------------------------- edges
@pytest.mark.parametrize("N,K,W", [(0, 10, 17), (7, 10, 0), (0, 0, 0)])
def test_empty_outputs(N, K, W):
    e = randn(N, K, dtype=torch.float16)
    assert dkt.project(e, 0, "uniform", 0.1, W).shape == (N, W)
    got = dkt.project_materialized(e, randn(K, W), out_dtype=torch.float32)
    assert got.shape == (N, W) and got.dtype == torch.float32


def test_zero_out_features_gives_zeros():
    e = randn(5, 0)
    cs = torch.ones(9, device=DEVICE)
    assert torch.equal(dkt.project(e, 0, "gaussian", 0.1, 9, 2.0, cs).cpu(), torch.zeros(5, 9))
    assert torch.equal(dkt.project_materialized(e, randn(0, 9)).cpu(), torch.zeros(5, 9))


def test_argument_validation():
    e = randn(4, 6)
    with pytest.raises(ValueError, match="distribution"):
        dkt.project(e, 0, "normal", 0.1, 8)
    with pytest.raises(ValueError, match="seed"):
        dkt.project(e, 2**32, "uniform", 0.1, 8)
    with pytest.raises(ValueError, match="seed"):
        dkt.project(e, -1, "uniform", 0.1, 8)
    with pytest.raises(TypeError, match="seed"):
        dkt.project(e, 1.5, "uniform", 0.1, 8)
    with pytest.raises(ValueError, match="density"):
        dkt.project(e, 0, "sparse", 1.5, 8)
    with pytest.raises(ValueError, match="width"):
        dkt.project(e, 0, "uniform", 0.1, -1)
    with pytest.raises(ValueError, match="e must be 2-D"):
        dkt.project(e[0], 0, "uniform", 0.1, 8)
    with pytest.raises(TypeError, match="e must be float32"):
        dkt.project(e.to(torch.int32), 0, "uniform", 0.1, 8)
    with pytest.raises(ValueError, match="col_scale must have 8"):
        dkt.project(e, 0, "uniform", 0.1, 8, col_scale=torch.ones(7, device=DEVICE))
    with pytest.raises(TypeError, match="out_dtype"):
        dkt.project(e, 0, "uniform", 0.1, 8, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="B must have e.shape"):
        dkt.project_materialized(e, randn(5, 8))
    with pytest.raises(TypeError, match="dtype"):
        dkt.feedback_matrix(0, "uniform", 0.1, 3, 3, torch.int64, DEVICE)
    other = "meta" if DEVICE == "cpu" else "cpu"
    with pytest.raises(ValueError, match="e is on"):
        dkt.project(torch.zeros(4, 6, device=other), 0, "uniform", 0.1, 8)


def test_is_available():
    assert dkt.is_available(DEVICE)
    assert not dkt.is_available("cpu" if DEVICE == "cuda" else "cuda")
    assert not dkt.is_available("mps")


def test_device_tables_are_written_by_a_kernel():
    """Per-launch tables go to the device as kernel arguments (no host copy), 256 values a launch."""
    from dfa_kernels.triton.tables import cached_table, device_table

    values = [2**40 + 3, -5, 1, 0] + list(range(300))
    assert device_table(values, torch.int64, DEVICE).tolist() == values
    scales = [0.5, -1.25, 3.0]
    assert device_table(scales, torch.float32, DEVICE).tolist() == scales
    assert cached_table(scales, torch.float32, DEVICE) is cached_table(scales, torch.float32, DEVICE)


def test_grouped_weight_grad_split_over_rows():
    """The split-K path (rows split over the grid, summed from an fp32 workspace) gives the same
    result as one pass; uneven row counts and splits that get no rows of a short layer."""
    from dfa_kernels.triton.grouped_gemm import grouped_weight_grad

    for shapes in (
        [(70, 5, 9), (3, 33, 17), (129, 16, 16)],  # (N, out, in)
        [(40, 16, 32), (9, 32, 16)],
    ):  # every width a multiple of 16: the alignment hints
        grads = [torch.randn(n, o, device=DEVICE) for n, o, _ in shapes]
        inputs = [torch.randn(n, i, device=DEVICE) for n, _, i in shapes]
        want = reference.grouped_weight_grad(grads, inputs)
        for splits in (1, 3):
            got = grouped_weight_grad(grads, inputs, splits=splits)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ autotuning, specialization, devices
TUNED_NAMES = {"project", "narrow", "points", "narrow_points", "grouped"}


def _run_tuned(name):
    """One call through the autotuned kernel `name`: (what it returned, the reference's)."""
    e = randn(7, 40 if name in ("project", "points") else 3)
    if name in ("project", "narrow"):
        return dkt.project(e, 5, "rademacher", 0.1, 300), reference.project(e.cpu(), 5, "rademacher", 0.1, 300)
    if name in ("points", "narrow_points"):
        args = (e, None, 5, "gaussian", 0.1, [0, 40], [200, 33], [1.0, 0.5], [None, randn(7, 33)], ["none", "silu"])
        got = dkt.project_points(*args)
        want = reference.project_points(
            *[a.cpu() if isinstance(a, torch.Tensor) else a for a in args[:8]], [None, args[8][1].cpu()], args[9]
        )
        return torch.cat(got, 1), torch.cat(want, 1)
    grads, inputs = [randn(50, 20), randn(9, 40)], [randn(50, 33), randn(9, 16)]
    return (
        torch.cat([g.flatten() for g in dkt.grouped_weight_grad(grads, inputs)]),
        torch.cat([g.flatten() for g in reference.grouped_weight_grad(grads, inputs)]),
    )


@pytest.mark.parametrize("name", sorted(TUNED_NAMES))
def test_fixed_config_matches_reference(name, monkeypatch):
    """The config DFA_TRITON_AUTOTUNE=0 launches (each kernel's first GPU config) is the one that
    runs, and its tiles give the reference's result."""
    tuned = tuning.TUNED[name]
    monkeypatch.setattr(tuned.launch, "configs", tuned.configs[:1])
    got, want = _run_tuned(name)
    assert tuned.launch.best_config is tuned.configs[0]
    torch.testing.assert_close(got.cpu(), want, atol=1e-4 * math.sqrt(50), rtol=1e-4)


def _import_in_subprocess(switch):
    """Import the kernels compiled (not interpreted; no GPU needed) with DFA_TRITON_AUTOTUNE=switch:
    {name: (configs launched, whether the first is configs[0], configs there are)}."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DFA_TRITON_AUTOTUNE")}
    if switch is not None:
        env["DFA_TRITON_AUTOTUNE"] = switch
    code = (
        "import dfa_kernels.triton\nfrom dfa_kernels.triton import tuning\n"
        "print({n: (len(t.launch.configs), t.launch.configs[0] is t.configs[0], len(t.configs)) "
        "for n, t in tuning.TUNED.items()})"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_autotune_switch():
    """DFA_TRITON_AUTOTUNE=0: every autotuned kernel launches its first config alone; unset: all of
    them; another value is refused."""
    off = _import_in_subprocess("0")
    assert off.returncode == 0, off.stderr
    off = ast.literal_eval(off.stdout.strip().splitlines()[-1])
    assert set(off) == TUNED_NAMES
    assert all(used == 1 and first for used, first, _ in off.values()), off
    on = _import_in_subprocess(None)
    assert on.returncode == 0, on.stderr
    on = ast.literal_eval(on.stdout.strip().splitlines()[-1])
    assert all(used == total > 1 for used, _, total in on.values()), on
    bad = _import_in_subprocess("no")
    assert bad.returncode != 0 and "DFA_TRITON_AUTOTUNE must be 0 or 1" in bad.stderr


def _config(bm, bn, bk=None):
    return triton.Config({"BM": bm, "BN": bn, **({} if bk is None else {"BK": bk})})


def _blocks(configs):
    return [tuple(c.kwargs[b] for b in ("BM", "BN", "BK") if b in c.kwargs) for c in configs]


def test_fit_tiles():
    configs = [_config(128, 128, 32), _config(64, 64, 64), _config(32, 32, 32)]
    assert tuning.fit_tiles(configs, BM=4096, BN=4096, BK=4096) == configs
    assert _blocks(tuning.fit_tiles(configs, BM=100, BN=64, BK=64)) == [(64, 64, 64), (32, 32, 32)]
    assert _blocks(tuning.fit_tiles(configs, BM=8, BN=1, BK=1)) == [(32, 32, 32)]  # the floor: 32
    assert _blocks(tuning.fit_tiles(configs, floor=16, BM=8, BN=1, BK=1)) == [(32, 32, 32)]  # none fits: least padding
    assert _blocks(tuning.fit_tiles([_config(64, 256), _config(128, 128)], BM=1000, BN=100)) == [(128, 128)]


def test_kernel_prunes():
    """Each autotuned kernel's early_config_prune on its own configs: a tiny problem keeps one small
    tile (no benchmarking), a large one keeps every config."""
    big = {
        "N": 1 << 16,
        "K": 4096,
        "W": 4096,
        "span_w": 4096,
        "o_bucket": 4096,
        "i_bucket": 4096,
        "rows_per_split": 1 << 16,
    }
    cases = [
        (project_mod.prune_project, "project", {"N": 8, "K": 40, "W": 17}, [(32, 32, 32)]),
        (project_mod.prune_narrow, "narrow", {"N": 7, "W": 200}, [(32, 256)]),
        (project_mod.prune_narrow, "narrow", {"N": 1, "W": 1}, [(32, 256)]),  # none fits: least padding
        (points_mod.prune_points, "points", {"N": 8, "K": 40, "span_w": 17}, [(32, 32, 32)]),
        (points_mod.prune_points, "narrow_points", {"N": 1000, "K": 3, "span_w": 100}, [(64, 128, 16), (128, 128, 16)]),
        (
            grouped_gemm.prune_grouped,
            "grouped",
            {"o_bucket": 16, "i_bucket": 16, "rows_per_split": 1000},
            [(32, 32, 64)],
        ),
        (grouped_gemm.prune_grouped, "grouped", {"o_bucket": 16, "i_bucket": 16, "rows_per_split": 9}, [(32, 32, 64)]),
    ]
    for prune, name, args, want in cases:
        configs = tuning.TUNED[name].configs
        assert _blocks(prune(configs, args)) == want, (name, args)
        assert prune(configs, big) == configs, name


def test_table_values_do_not_change_the_compiled_kernel(monkeypatch):
    """Tuple elements are specialized on their values even under do_not_specialize: the tables
    pass encoded integers, so different values (a batch size, a null pointer) and lengths within
    a power of two give the fill kernel the same signature and specialization."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda dst, values, n, **meta: launches.append((values, meta))

    monkeypatch.setattr(tables, "_fill_kernel", Recorder())
    raw = ([1, 16, 17, 2**40, 0], [0, 3, 2**33, -5, 7, 1, 64])
    for values in raw:
        tables.device_table(values, torch.int64, DEVICE)
    tables.device_table([0.5, 1, 2], torch.float32, DEVICE)
    tables.device_table([3.0, -1.0, 1.0, 16.0], torch.float32, DEVICE)

    def spec(values):
        return native_specialize_impl(BaseBackend, values, False, True, True)

    assert spec(tuple(raw[0][:5])) != spec(tuple(raw[1][:5]))  # what encoding avoids
    (a, meta_a), (b, meta_b), (x, meta_x), (y, meta_y) = launches
    assert spec(a) == spec(b) and meta_a == meta_b == {"COUNT": 8, "ENCODED": True}
    assert spec(x) == spec(y) and meta_x == meta_y == {"COUNT": 4, "ENCODED": False}
    with pytest.raises(ValueError, match="2\\^57"):
        tables.device_table([2**57], torch.int64, DEVICE)


def test_device_guard():
    """A launch is made on its tensors' CUDA device (Triton launches on the current one)."""
    guard = tuning.device_guard(torch.device("cuda", 1))  # not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(tuning.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.skipif(DEVICE != "cpu", reason="watches the interpreter's launches")
def test_every_launch_runs_under_the_device_guard(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    guarded, launches = [], []

    @contextlib.contextmanager
    def guard(device):
        guarded.append(device)
        yield
        guarded.pop()

    for module in (project_mod, points_mod, grouped_gemm, tables, cross_entropy):
        monkeypatch.setattr(module, "device_guard", guard)
    run = InterpretedFunction.run

    def watched(self, *args, **kwargs):
        launches.append((self.__name__, list(guarded)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", watched)
    for name in sorted(TUNED_NAMES):
        _run_tuned(name)
    dkt.feedback_matrix(0, "uniform", 0.1, 3, 5, torch.float32, DEVICE)
    cross_entropy.cross_entropy_grad_(
        randn(3, 10), torch.tensor([1, 2, -100], device=DEVICE), -100, torch.tensor([0.5], device=DEVICE)
    )
    assert {name for name, _ in launches} == {
        "_project_kernel",
        "_narrow_kernel",
        "_points_kernel",
        "_grouped_kernel",
        "_fill_kernel",
        "_feedback_kernel",
        "_ce_kernel",
    }
    assert all(devices == [torch.device(DEVICE)] for _, devices in launches), launches


def test_device_caches_are_per_device(monkeypatch):
    """SM counts and cached tables are kept per CUDA device index; a bare "cuda" is the current device."""
    asked = []

    def properties(index):
        asked.append(index)
        return types.SimpleNamespace(multi_processor_count=100 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    grouped_gemm._sm_count.cache_clear()
    try:
        counts = [grouped_gemm._sm_count(tuning.device_index(d)) for d in ("cuda:0", "cuda", torch.device("cuda", 1))]
        assert counts == [100, 101, 101] and asked == [0, 1]
    finally:
        grouped_gemm._sm_count.cache_clear()

    monkeypatch.setattr(tables, "_CACHE", {})
    monkeypatch.setattr(tables, "device_table", lambda values, dtype, device: object())
    t0, t1, bare = (tables.cached_table([1, 2], torch.int64, d) for d in ("cuda:0", torch.device("cuda", 1), "cuda"))
    assert t0 is not t1 and bare is t1 and len(tables._CACHE) == 2
