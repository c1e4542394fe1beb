"""The compiled ops (torch.ops.dfa_kernels.*, C++ CPU and CUDA) against the plain-PyTorch reference.

CUDA variants are skipped without a GPU; the CUDA kernels are still compiled and linked by the
build (see build_config()["cuda_compiled"]).

Tolerances: fp32 summation order and the final rounding; where a CUDA path rounds B to e's 16-bit
dtype (csrc/cuda/project.cu, out_features K > 16: the virtual tensor-core kernel for uniform and
gaussian B, the materialized cuBLAS path for any B) also that rounding: for materialized B, which
the tests build, the reference multiplies the same B.to(e.dtype) (materialized_B); for virtual B,
generated inside the kernel, the tolerance has a term of B_ROUND_UNITS * eps * sqrt(K) * rms(e) *
rms(B) (see tests/test_cuda_kernels.py's doc; test_b_rounding_tolerance_covers_simulated_rounding
checks the term against a simulation of the rounding on the CPU).
"""

import math
import sys

import pytest
import torch

import dfa_kernels._C as _C  # loads the library and registers torch.ops.dfa_kernels.*
from dfa_kernels import reference

ops = torch.ops.dfa_kernels
DISTRIBUTIONS = reference.DISTRIBUTIONS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DENSITY = 0.3
SEED = 1234
# Rounding of the final cast: the kernels and the reference may land on either side.
OUT_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# B's rounding on the CUDA paths (see the module doc and tests/test_cuda_kernels.py, whose constants
# these are: kNarrowMaxK of the CUDA plan, on which csrc/cuda/project.cu dispatches, and the units of
# the simulated bound; test_rounding_constants_agree_with_test_cuda_kernels keeps them equal).
NARROW_MAX_K = 16
B_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
B_RMS = {"uniform": 3**-0.5, "gaussian": 1.0, "rademacher": 1.0, "sparse": DENSITY**0.5}
B_ROUND_UNITS = 8


def virtual_b_round(device, dtype, distribution, K) -> float:
    """eps * rms(B) where the CUDA tensor-core kernel rounds its generated B (16-bit e, K > 16,
    uniform or gaussian: rademacher and sparse are exact in 16 bits), else 0."""
    if device != "cuda" or dtype not in B_EPS or K <= NARROW_MAX_K or distribution not in ("uniform", "gaussian"):
        return 0.0
    return B_EPS[dtype] * B_RMS[distribution]


def materialized_B(B, device, dtype):
    """B as project_materialized multiplies it: the CUDA path converts B to e's 16-bit dtype for
    cuBLAS when K > 16 (the narrow kernel and the CPU op read it in fp32)."""
    return B.to(dtype) if device == "cuda" and dtype in B_EPS and B.shape[0] > NARROW_MAX_K else B


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: CUDA kernels compiled but not run")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# (N, out_features, width): N in {0, 1, 7, 33, 1000}, out_features in {1, 3, 10, 50257 (small
# widths only)}, width in {1, 17, 128, 4096 (small out_features only)}.
SHAPES = (
    [(n, k, w) for n in (0, 1, 7, 33, 1000) for k in (1, 3, 10) for w in (1, 17, 128, 4096)]
    + [(n, 50257, w) for n in (0, 1, 7) for w in (1, 17)]
    + [(1000, 50257, 17)]
)

_B_CACHE = {}
_E_CACHE = {}


def activations(N, K, dtype):
    """A fixed random e [N, K] (cached: the 50257-wide ones are slow to draw)."""
    if (N, K) not in _E_CACHE:
        _E_CACHE[(N, K)] = torch.randn(N, K, generator=torch.Generator().manual_seed(N * 100003 + K))
    return _E_CACHE[(N, K)].to(dtype)


def reference_B(distribution, rows, cols, seed=SEED, density=DENSITY):
    key = (distribution, rows, cols, seed, density)
    if key not in _B_CACHE:
        _B_CACHE[key] = reference.feedback_matrix(seed, distribution, rows, cols, density)
    return _B_CACHE[key]


def assert_matches_reference(got, e, B, scale=1.0, col_scale=None, out_dtype=None, b_round=0.0):
    """got == reference up to fp32 summation order and the final rounding; b_round: eps * rms(B)
    where the kernel rounded B to e's dtype (virtual_b_round), else 0."""
    want = reference.project_materialized(
        e.cpu(), B.cpu(), scale, None if col_scale is None else col_scale.cpu(), torch.float32
    )
    out_dtype = out_dtype or e.dtype
    assert got.shape == want.shape and got.dtype == out_dtype
    K = e.shape[1]
    emax = float(e.abs().max()) if e.numel() else 1.0
    erms = float(e.float().pow(2).mean().sqrt()) if e.numel() else 0.0
    csmax = float(col_scale.abs().max()) if col_scale is not None and col_scale.numel() else 1.0
    atol = (1e-5 * max(emax, 1.0) + B_ROUND_UNITS * b_round * erms) * math.sqrt(max(K, 1)) * abs(scale) * csmax + 1e-6
    torch.testing.assert_close(got.cpu().float(), want, rtol=OUT_RTOL[out_dtype], atol=atol)


def test_build_config():
    config = _C.build_config()
    assert set(config) == {"cuda_compiled", "cuda_archs", "torch_version_built", "cuda_version_built", "openmp"}
    assert isinstance(config["cuda_compiled"], bool)
    assert isinstance(config["openmp"], bool)
    assert isinstance(config["cuda_archs"], list) and all(isinstance(a, str) for a in config["cuda_archs"])
    assert torch.__version__.startswith(config["torch_version_built"])
    if config["cuda_compiled"]:
        assert config["cuda_archs"] and isinstance(config["cuda_version_built"], str)
    else:
        assert config["cuda_archs"] == [] and config["cuda_version_built"] is None


# ------------------------------------------------------------------ feedback_matrix
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("rows,cols", [(0, 5), (5, 0), (1, 1), (3, 31), (10, 33), (50, 1000), (257, 300)])
def test_feedback_matrix_matches_reference(device, distribution, rows, cols):
    got = ops.feedback_matrix(SEED, distribution, DENSITY, rows, cols, torch.float32, torch.device(device))
    assert got.shape == (rows, cols) and got.dtype == torch.float32 and got.device.type == device
    want = reference_B(distribution, rows, cols)
    if distribution == "gaussian":  # libm vs torch log/cos: last-bit differences (see hash.h)
        assert ((got.cpu() - want).abs() <= 1e-5 * (1 + want.abs())).all()
    else:  # integer-derived values: bit-identical
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("distribution", ["uniform", "rademacher", "sparse"])
def test_feedback_matrix_dtypes(device, dtype, distribution):
    got = ops.feedback_matrix(7, distribution, DENSITY, 20, 70, dtype, torch.device(device))
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), reference_B(distribution, 20, 70, seed=7).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**32 - 1])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_feedback_matrix_seeds_and_density(device, seed, density):
    got = ops.feedback_matrix(seed, "sparse", density, 9, 40, torch.float32, torch.device(device)).cpu()
    assert torch.equal(got, reference.feedback_matrix(seed, "sparse", 9, 40, density))
    if density == 0.0:
        assert not got.any()
    if density == 1.0:
        assert (got.abs() == 1).all()
    for distribution in ("uniform", "rademacher"):
        got = ops.feedback_matrix(seed, distribution, 0.1, 9, 40, torch.float32, torch.device(device))
        assert torch.equal(got.cpu(), reference.feedback_matrix(seed, distribution, 9, 40))


def test_hash_test_vectors():
    """The published vectors of hash.h, through the compiled generator."""
    B = ops.feedback_matrix(42, "uniform", 0.1, 4, 18, torch.float32, torch.device("cpu"))
    assert B[3, 17].item() == -0.2195887565612793
    B = ops.feedback_matrix(0, "uniform", 0.1, 2, 2, torch.float32, torch.device("cpu"))
    assert B[0, 0].item() == 0.7378687858581543 and B[0, 1].item() == -0.5789018869400024
    assert B[1, 0].item() == 0.07688891887664795
    B = ops.feedback_matrix(0, "gaussian", 0.1, 1, 2, torch.float32, torch.device("cpu"))
    assert B[0, 0].item() == pytest.approx(-0.299004, abs=1e-5)
    assert B[0, 1].item() == pytest.approx(1.689729, abs=1e-5)


# ------------------------------------------------------------------ project
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_project_matches_reference(device, dtype, distribution, shape):
    N, K, W = shape
    e = activations(N, K, dtype)
    got = ops.project(e.to(device), SEED, distribution, DENSITY, W, 1.0, None, None)
    assert got.device.type == device
    assert_matches_reference(
        got, e, reference_B(distribution, K, W), b_round=virtual_b_round(device, dtype, distribution, K)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", [None] + DTYPES, ids=str)
@pytest.mark.parametrize("with_col_scale", [False, True])
def test_project_scale_col_scale_out_dtype(device, distribution, dtype, out_dtype, with_col_scale):
    N, K, W = 37, 300, 259
    e = torch.randn(N, K).to(dtype)
    col_scale = torch.rand(W) + 0.5 if with_col_scale else None
    dev_cs = None if col_scale is None else col_scale.to(device)
    B = reference_B(distribution, K, W)
    got = ops.project(e.to(device), SEED, distribution, DENSITY, W, -0.125, dev_cs, out_dtype)
    assert_matches_reference(
        got, e, B, -0.125, col_scale, out_dtype, b_round=virtual_b_round(device, dtype, distribution, K)
    )
    got = ops.project_materialized(e.to(device), B.to(device), -0.125, dev_cs, out_dtype)
    assert_matches_reference(got, e, materialized_B(B, device, dtype), -0.125, col_scale, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", ["rademacher", "sparse"])
def test_project_exact_on_integers(device, distribution):
    """Small-integer e with +-1/0 entries: every sum is exact, so any order gives the same bits.
    Shapes span several K chunks and column blocks, with partial ones at both ends."""
    N, K, W = 70, 700, 600
    e = torch.randint(-3, 4, (N, K)).float()
    got = ops.project(e.to(device), SEED, distribution, DENSITY, W, 1.0, None, None)
    assert torch.equal(got.cpu(), e @ reference_B(distribution, K, W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 10, 17), (5, 10, 0), (5, 0, 17), (0, 0, 0)], ids=str)
def test_project_empty_shapes(device, shape):
    N, K, W = shape
    e = torch.randn(N, K, device=device, dtype=torch.float16)
    col_scale = torch.ones(W, device=device)
    for got in (
        ops.project(e, SEED, "uniform", DENSITY, W, 2.0, col_scale, torch.float32),
        ops.project_materialized(e, torch.randn(K, W, device=device), 2.0, col_scale, torch.float32),
    ):
        assert got.shape == (N, W) and got.dtype == torch.float32 and got.device.type == device
        assert not got.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_project_materialized_any_B(device, b_dtype):
    e = torch.randn(9, 20)
    B = torch.randn(30, 20).to(b_dtype).t()  # non-contiguous [20, 30]
    got = ops.project_materialized(e.to(device), B.to(device), 0.5, None, None)
    assert_matches_reference(got, e, B.float(), 0.5)


@needs_cuda
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize(
    "shape", [(1, 50257, 300), (16, 5000, 4096), (17, 999, 130), (64, 4096, 1000), (4099, 129, 515)], ids=str
)
def test_cuda_matches_cpu(distribution, shape):
    """Kernel configurations (row tiles, split-K, edge tiles) against the CPU op, which does not
    round B: the bf16 tensor-core kernel does (uniform and gaussian), hence the b_round term."""
    N, K, W = shape
    e = torch.randn(N, K, dtype=torch.bfloat16)
    got = ops.project(e.cuda(), SEED, distribution, DENSITY, W, 1.0, None, torch.float32)
    want = ops.project(e, SEED, distribution, DENSITY, W, 1.0, None, torch.float32)
    erms = float(e.float().pow(2).mean().sqrt())
    b_round = virtual_b_round("cuda", torch.bfloat16, distribution, K)
    atol = (1e-5 * float(e.abs().max()) + B_ROUND_UNITS * b_round * erms) * math.sqrt(K)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=atol)


# ------------------------------------------------------------------ B's rounding, simulated on the CPU
def simulated_rounding(e, B, distribution, seed=0):
    """What a CUDA path that rounds B to e's dtype computes, up to its summation order: e @ B16 in
    fp32, gaussian entries first moved by up to the 1e-5 (1 + |z|) that CUDA's logf/cosf may differ
    from libm by, so that some of their roundings flip as they may on the device."""
    if distribution == "gaussian":
        g = torch.Generator().manual_seed(seed)
        B = B + 1e-5 * (1 + B.abs()) * (torch.rand(B.shape, generator=g) * 2 - 1)
    return e.float() @ B.to(e.dtype).float()


# The shapes of the tests that take a rounding path on the GPU, the largest errors first: out_features
# 17 (few terms: heavy tails), the tensor-core tiles, a vocabulary-sized K. (N, K, W, scale, col_scale)
ROUNDING_SHAPES = {
    "test_compiled": [
        (7, 50257, 17, 1.0, False),
        (37, 300, 259, -0.125, True),
        (17, 999, 130, 1.0, False),
        (4099, 129, 515, 1.0, False),
    ],
    "test_cuda_kernels": [(1000, 17, 1000, 0.5, False), (64, 700, 515, 2.0, True), (256, 1000, 256, 0.5, False)],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distribution", ["uniform", "gaussian"])
def test_b_rounding_tolerance_covers_simulated_rounding(dtype, distribution, monkeypatch):
    """The tolerances of the CUDA tests with B rounded to e's dtype (this file's and
    test_cuda_kernels.py's, through their own assertion helpers), against a CPU simulation of that
    rounding on those tests' shapes: each passes with the rounding term at 3/4 of its size (a
    margin), and fails without it (the term is needed: the old tolerances had none)."""
    import test_cuda_kernels as tck  # its helpers; its tests themselves need a GPU

    this = sys.modules[__name__]
    for N, K, W, scale, with_cs in ROUNDING_SHAPES["test_compiled"]:
        e = activations(N, K, dtype)
        B = reference_B(distribution, K, W)
        cs = torch.rand(W) + 0.5 if with_cs else None
        got = simulated_rounding(e, B, distribution) * scale
        got = (got if cs is None else got * cs).to(dtype)
        b_round = virtual_b_round("cuda", dtype, distribution, K)
        monkeypatch.setattr(this, "B_ROUND_UNITS", 0.75 * B_ROUND_UNITS)
        assert_matches_reference(got, e, B, scale, cs, dtype, b_round=b_round)
        monkeypatch.setattr(this, "B_ROUND_UNITS", 0)
        with pytest.raises(AssertionError):
            assert_matches_reference(got, e, B, scale, cs, dtype, b_round=b_round)
        monkeypatch.undo()
    for N, K, W, scale, with_cs in ROUNDING_SHAPES["test_cuda_kernels"]:
        e = tck._e(N, K, dtype)
        B = reference.feedback_matrix(tck.SEED, distribution, K, W, tck.DENSITY)
        cs = torch.rand(W) + 0.5 if with_cs else None
        factor = 1.5 if with_cs else 1.0  # test_project_out_dtype_and_col_scale: col_scale <= 1.5
        for out_dtype in (dtype, torch.float32):
            want = ops.project(e, tck.SEED, distribution, tck.DENSITY, W, scale, cs, out_dtype)  # the CPU op
            got = simulated_rounding(e, B, distribution) * scale
            got = (got if cs is None else got * cs).to(out_dtype)
            b_round = tck._b_round(dtype, distribution, K)
            monkeypatch.setattr(tck, "B_ROUND_UNITS", 0.75 * tck.B_ROUND_UNITS)
            tck._close(got, want, factor * tck._atol(e, K, scale, b_round), out_dtype, f"{N} {K} {W}")
            monkeypatch.setattr(tck, "B_ROUND_UNITS", 0)
            with pytest.raises(AssertionError):
                tck._close(got, want, factor * tck._atol(e, K, scale, b_round), out_dtype)
            monkeypatch.undo()


def test_rounding_constants_agree_with_test_cuda_kernels():
    import test_cuda_kernels as tck

    assert (NARROW_MAX_K, B_ROUND_UNITS, B_RMS["uniform"], B_RMS["gaussian"]) == (
        tck.NARROW_MAX_K,
        tck.B_ROUND_UNITS,
        tck.B_RMS["uniform"],
        tck.B_RMS["gaussian"],
    )
    assert all(B_EPS[d] == tck.EPS[d] for d in B_EPS)
    B = torch.randn(40, 9)
    assert materialized_B(B, "cuda", torch.bfloat16).dtype == tck._materialized_b(B, torch.bfloat16, 40).dtype


# ------------------------------------------------------------------ validation
def _e(shape=(4, 6), dtype=torch.float32):
    return torch.randn(shape).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d: ops.project(_e((24,)).to(d), 0, "uniform", 0.1, 8, 1.0, None, None), "e must be a 2-D tensor"),
        (lambda d: ops.project(_e((2, 3, 4)).to(d), 0, "uniform", 0.1, 8, 1.0, None, None), "e must be a 2-D tensor"),
        (
            lambda d: ops.project(_e(dtype=torch.float64).to(d), 0, "uniform", 0.1, 8, 1.0, None, None),
            "e must be float32, float16 or bfloat16",
        ),
        (
            lambda d: ops.project(torch.ones(4, 6, dtype=torch.int32, device=d), 0, "uniform", 0.1, 8, 1.0, None, None),
            "e must be float32, float16 or bfloat16",
        ),
        (lambda d: ops.project(_e((6, 4)).to(d).t(), 0, "uniform", 0.1, 8, 1.0, None, None), "e must be contiguous"),
        (lambda d: ops.project(_e().to(d), 0, "uniform", 0.1, -1, 1.0, None, None), r"width must be in \[0, 2\^32\]"),
        (lambda d: ops.project(_e().to(d), -1, "uniform", 0.1, 8, 1.0, None, None), r"seed must be in \[0, 2\^32\)"),
        (lambda d: ops.project(_e().to(d), 2**32, "uniform", 0.1, 8, 1.0, None, None), r"seed must be in \[0, 2\^32\)"),
        (
            lambda d: ops.project(_e().to(d), 0, "normal", 0.1, 8, 1.0, None, None),
            'distribution must be one of "uniform", "gaussian", "rademacher", "sparse"; got "normal"',
        ),
        (lambda d: ops.project(_e().to(d), 0, "sparse", 1.5, 8, 1.0, None, None), r"density must be in \[0, 1\]"),
        (
            lambda d: ops.project(_e().to(d), 0, "sparse", float("nan"), 8, 1.0, None, None),
            r"density must be in \[0, 1\]",
        ),
        (
            lambda d: ops.project(_e().to(d), 0, "uniform", 0.1, 8, 1.0, torch.ones(7, device=d), None),
            r"col_scale must have shape \[width\] = \[8\]",
        ),
        (
            lambda d: ops.project(
                _e().to(d), 0, "uniform", 0.1, 8, 1.0, torch.ones(8, dtype=torch.float16, device=d), None
            ),
            "col_scale must be float32",
        ),
        (
            lambda d: ops.project(_e().to(d), 0, "uniform", 0.1, 8, 1.0, None, torch.float64),
            "out_dtype must be float32, float16 or bfloat16",
        ),
        (
            lambda d: ops.project_materialized(_e().to(d), torch.randn(5, 8, device=d), 1.0, None, None),
            r"B.size\(0\) must equal e.size\(1\) \(out_features = 6\)",
        ),
        (
            lambda d: ops.project_materialized(_e().to(d), torch.randn(6, device=d), 1.0, None, None),
            "B must be a 2-D tensor",
        ),
        (
            lambda d: ops.project_materialized(
                _e().to(d), torch.ones(6, 8, dtype=torch.int64, device=d), 1.0, None, None
            ),
            "B must be a floating-point tensor",
        ),
        (
            lambda d: ops.project_materialized(
                _e().to(d), torch.randn(6, 8, device=d), 1.0, torch.ones(3, device=d), None
            ),
            r"col_scale must have shape \[width\] = \[8\]",
        ),
        (
            lambda d: ops.feedback_matrix(0, "uniform", 0.1, -1, 4, torch.float32, torch.device(d)),
            r"rows must be in \[0, 2\^32\]",
        ),
        (
            lambda d: ops.feedback_matrix(0, "uniform", 0.1, 4, -4, torch.float32, torch.device(d)),
            r"cols must be in \[0, 2\^32\]",
        ),
        (
            lambda d: ops.feedback_matrix(0, "uniform", 0.1, 4, 4, torch.int32, torch.device(d)),
            "dtype must be float32, float64, float16 or bfloat16",
        ),
        (
            lambda d: ops.feedback_matrix(0, "cauchy", 0.1, 4, 4, torch.float32, torch.device(d)),
            "distribution must be one of",
        ),
    ],
)
def test_validation_errors(device, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(device)


@needs_cuda
def test_validation_device_mismatch():
    e = _e().cuda()
    with pytest.raises(RuntimeError, match="col_scale must be on the same device as e"):
        ops.project(e, 0, "uniform", 0.1, 8, 1.0, torch.ones(8), None)
    with pytest.raises(RuntimeError, match="B must be on the same device as e"):
        ops.project_materialized(e, torch.randn(6, 8), 1.0, None, None)


def test_feedback_matrix_without_cuda_kernels():
    if _C.build_config()["cuda_compiled"]:
        pytest.skip("CUDA kernels compiled: the CPU-only error does not apply")
    with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
        ops.feedback_matrix(0, "uniform", 0.1, 4, 4, torch.float32, torch.device("cuda"))
