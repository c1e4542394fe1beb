"""The CUDA kernels (csrc/cuda/) against the CPU ops on awkward shapes: project (SIMT, tensor-core and
narrow-out_features paths), project_materialized, project_points and grouped_weight_grad.

GPU only: skipped, with the reason shown, where no GPU is visible or the CUDA kernels were not built.
Tolerances: both sides accumulate in fp32 (different orders); gaussian B differs by <= 1e-5 (1 + |z|)
between libm and CUDA. Two CUDA paths round B to e's 16-bit dtype before an fp32-accumulated product
(csrc/cuda/project.cu), and the tests model exactly those:
  * project (virtual B), fp16/bf16 e, out_features K > 16 on sm_80+: the tensor-core kernel generates
    B in e's dtype. Uniform and gaussian entries are rounded (relative error <= eps), rademacher and
    sparse (+-1, 0) are exact. The product's error is then about 0.43 sqrt(K) rms(e) rms(B) eps (its
    rms); its maximum over a test's outputs reached 4 such units in a CPU simulation of the rounding
    over these tests' shapes and six seeds (heavy tails at K = 17), so the tolerance has
    B_ROUND_UNITS = 8 of them (_b_round, _atol); the former 4 * eps, without rms(B), was used up to
    93% by gaussian B. test_compiled.py::test_b_rounding_tolerance_covers_simulated_rounding reruns
    that simulation on the largest-error shapes on every CPU run, through _atol and _close below.
  * project_materialized, fp16/bf16 e, K > 16: cuBLAS in e's dtype, B converted to it first. The test
    builds B, so the CPU reference gets the same B.to(e.dtype) (_materialized_b): exact, no extra term.
  K <= 16 takes the narrow kernel, which reads or generates B in fp32 (or B's own 16-bit dtype), and
  project_points runs the SIMT tile in fp32: neither rounds B, and their tolerances have no B term.
"""

import math

import pytest
import torch

from dfa_kernels import ops, reference

torch_ops = torch.ops.dfa_kernels
_built = ops._C is not None and ops._C.build_config()["cuda_compiled"]
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernel tests need a GPU (none visible)"),
    pytest.mark.skipif(not _built, reason="dfa_kernels was built without its CUDA kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTRIBUTIONS = reference.DISTRIBUTIONS
ACTIVATIONS = reference.ACTIVATIONS
NS = [0, 1, 7, 129, 1000]
KS = [1, 3, 4, 10, 16, 17, 1000]
SEED, DENSITY = 1234, 0.25
# relative tolerance of one output rounding
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
NARROW_MAX_K = 16  # kNarrowMaxK of the CUDA plan: project.cu sends K <= it to the narrow kernel (B in fp32)
B_RMS = {"uniform": 3**-0.5, "gaussian": 1.0, "rademacher": 1.0, "sparse": DENSITY**0.5}
# Units of eps * sqrt(K) * rms(e) * rms(B) in the tolerance of a product with B rounded to e's dtype:
# twice the largest error seen in the simulation (see the module doc).
B_ROUND_UNITS = 8


def _e(N, K, dtype, kind="randn"):
    e = torch.randn(N, K) if kind == "randn" else torch.rand(N, K) * 4 - 2
    return e.to(dtype)


def _atol(e, K, scale=1.0, b_round=0.0):
    """Error bound of an fp32-accumulated length-K dot product of e's rows (see the module doc);
    b_round: eps * rms(B) where the kernel rounds B to e's dtype (_b_round), else 0."""
    rms = float(e.float().pow(2).mean().sqrt()) if e.numel() else 0.0
    return math.sqrt(max(K, 1)) * rms * abs(scale) * (1e-4 + B_ROUND_UNITS * b_round) + 1e-6


def _b_round(e_dtype, distribution, K):
    """eps(e's dtype) * rms(B) where project's tensor-core kernel rounds generated B (16-bit e,
    K > NARROW_MAX_K, uniform or gaussian: the other distributions are exact in 16 bits), else 0.
    On a GPU older than sm_80 the SIMT kernel runs instead and the term is only looser."""
    if K <= NARROW_MAX_K or distribution not in ("uniform", "gaussian"):
        return 0.0
    return EPS[e_dtype] * B_RMS[distribution]


def _materialized_b(B, e_dtype, K):
    """B as project_materialized's CUDA path multiplies it: converted to e's dtype for cuBLAS when e
    is 16-bit and K > NARROW_MAX_K; as given (fp64 read as fp32, like the CPU op) otherwise."""
    return B.to(e_dtype) if e_dtype != torch.float32 and K > NARROW_MAX_K else B


def _close(got, want, atol, out_dtype, msg=""):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=atol, rtol=RTOL[out_dtype], msg=msg)


# ------------------------------------------------------------------ project / project_materialized
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_project_matches_cpu(dtype, distribution):
    """Every row count and out_features (narrow K <= 16 kernel, SIMT and tensor-core paths)."""
    for N in NS:
        for K in KS:
            for W in (1, 37, 130, 256):  # 256: aligned 4-wide stores
                e = _e(N, K, dtype)
                args = (SEED, distribution, DENSITY, W, 0.5, None, None)
                got = torch_ops.project(e.cuda(), *args)
                want = torch_ops.project(e, *args)
                _close(got, want, _atol(e, K, 0.5, _b_round(dtype, distribution, K)), dtype, f"N={N} K={K} W={W}")


@pytest.mark.parametrize("distribution", ["uniform", "rademacher"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=IDS.get)
def test_project_out_dtype_and_col_scale(distribution, out_dtype):
    for dtype in DTYPES:
        for N, K, W in [(5, 3, 1000), (300, 16, 257), (64, 700, 515)]:
            e = _e(N, K, dtype)
            cs = torch.rand(W) + 0.5
            got = torch_ops.project(e.cuda(), SEED, distribution, DENSITY, W, 2.0, cs.cuda(), out_dtype)
            want = torch_ops.project(e, SEED, distribution, DENSITY, W, 2.0, cs, out_dtype)
            _close(
                got, want, 1.5 * _atol(e, K, 2.0, _b_round(dtype, distribution, K)), out_dtype, f"{dtype} {N} {K} {W}"
            )


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_project_materialized_matches_cpu(dtype, b_dtype):
    for N in NS:
        for K in KS:
            for W in (131, 128):
                e = _e(N, K, dtype)
                B = torch.randn(K, W).to(b_dtype)
                got = torch_ops.project_materialized(e.cuda(), B.cuda(), 0.25, None, None)
                want = torch_ops.project_materialized(e, _materialized_b(B, dtype, K), 0.25, None, None)
                _close(got, want, _atol(e, K, 0.25 * 3), dtype, f"N={N} K={K} W={W}")
    # a non-contiguous B and a column scale, on the narrow kernel (K = 7) and on cuBLAS (K = 40)
    for K in (7, 40):
        e, B = _e(33, K, dtype), torch.randn(50, K).to(b_dtype).t()
        cs = torch.rand(50)
        got = torch_ops.project_materialized(e.cuda(), B.cuda(), 1.0, cs.cuda(), torch.float32)
        want = torch_ops.project_materialized(e, _materialized_b(B, dtype, K), 1.0, cs, torch.float32)
        _close(got, want, _atol(e, K, 3), torch.float32, f"K={K}")


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
def test_project_tensor_core_path(dtype, distribution):
    """Shapes with enough 128 x 128 tiles for the tensor-core kernel: K a multiple of 8 (16-byte loads
    of e) or not, a misaligned e (scalar loads), edge tiles in both dimensions."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K, W, misaligned in [(2049, 1000, 2050, False), (1500, 17, 3001, False), (4096, 336, 1024, True)]:
        assert math.ceil(N / 128) * math.ceil(W / 128) >= sms, "shape too small to select the tensor-core path"
        e = _e(N, K, dtype)
        ec = e.cuda()
        if misaligned:  # contiguous, but starting 2 bytes into an allocation
            ec = torch.empty(N * K + 1, dtype=dtype, device="cuda")[1:].view(N, K).copy_(ec)
        want = torch_ops.project(e, SEED, distribution, DENSITY, W, 0.5, None, torch.float32)
        for out_dtype in (dtype, torch.float32):
            got = torch_ops.project(ec, SEED, distribution, DENSITY, W, 0.5, None, out_dtype)
            _close(
                got,
                want.to(out_dtype),
                _atol(e, K, 0.5, _b_round(dtype, distribution, K)),
                out_dtype,
                f"N={N} K={K} W={W}",
            )


def test_project_large_vocab_split_k():
    """Few tiles, long K: the split-K path and its deterministic reduction."""
    e = _e(3, 50257, torch.bfloat16)
    a = torch_ops.project(e.cuda(), SEED, "gaussian", DENSITY, 300, 1.0, None, torch.float32)
    b = torch_ops.project(e.cuda(), SEED, "gaussian", DENSITY, 300, 1.0, None, torch.float32)
    assert torch.equal(a, b)
    want = torch_ops.project(e, SEED, "gaussian", DENSITY, 300, 1.0, None, torch.float32)
    _close(a, want, _atol(e, 50257, 1.0, _b_round(torch.bfloat16, "gaussian", 50257)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_project_opcheck(dtype):
    e = _e(9, 5, dtype).cuda().requires_grad_()
    torch.library.opcheck(torch_ops.project.default, (e, SEED, "uniform", DENSITY, 19, 0.5, None, None))
    e = _e(40, 100, dtype).cuda()
    torch.library.opcheck(torch_ops.project.default, (e, SEED, "rademacher", DENSITY, 70, 1.0, None, torch.float32))
    B = torch.randn(5, 12, device="cuda")
    torch.library.opcheck(torch_ops.project_materialized.default, (_e(9, 5, dtype).cuda(), B, 0.5, None, None))


def test_project_gradients():
    e, w = torch.randn(6, 5), torch.randn(6, 21)
    grads = []
    for device in ("cpu", "cuda"):
        x = e.to(device).requires_grad_()
        out = torch_ops.project(x, SEED, "uniform", DENSITY, 21, 0.5, None, None)
        grads.append(torch.autograd.grad((out * w.to(device)).sum(), x)[0].cpu())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ project_points
def _points(N, widths, dtype, act_dtype=None, activations=None, layout="independent", seed=0):
    """offsets, scales, act_inputs and activations for points of the given widths."""
    g = torch.Generator().manual_seed(seed)
    if layout == "independent":
        offsets = [sum(widths[:i]) for i in range(len(widths))]
    else:  # shared: every point reads the first columns
        offsets = [0] * len(widths)
    activations = activations or [ACTIVATIONS[i % len(ACTIVATIONS)] for i in range(len(widths))]
    scales = [0.5 + 0.25 * i for i in range(len(widths))]
    acts = [
        None if a == "none" else (torch.randn(N, w, generator=g) * 2).to(act_dtype or dtype)
        for a, w in zip(activations, widths)
    ]
    return offsets, scales, acts, activations


def _run_points(e, B, offsets, widths, scales, acts, activations, out_dtype, distribution="uniform"):
    cuda = torch_ops.project_points(
        e.cuda(),
        None if B is None else B.cuda(),
        SEED,
        distribution,
        DENSITY,
        offsets,
        widths,
        scales,
        [None if a is None else a.cuda() for a in acts],
        activations,
        out_dtype,
    )
    cpu = torch_ops.project_points(
        e, B, SEED, distribution, DENSITY, offsets, widths, scales, acts, activations, out_dtype
    )
    return cuda, cpu


@pytest.mark.parametrize("storage", ["virtual", "materialized"])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_project_points_matches_cpu(dtype, distribution, storage):
    widths = [1, 33, 130, 7, 64, 5]
    for N in NS:
        for K in KS:
            e = _e(N, K, dtype)
            offsets, scales, acts, activations = _points(N, widths, dtype)
            B = None
            if storage == "materialized":
                B = reference.feedback_matrix(SEED, distribution, K, sum(widths), DENSITY)
            got, want = _run_points(e, B, offsets, widths, scales, acts, activations, None, distribution)
            for l, (g, w) in enumerate(zip(got, want)):  # the SIMT tile in fp32: B is not rounded
                _close(g, w, _atol(e, K, 2.0 * scales[l]), dtype, f"N={N} K={K} point {l}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("act_dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=IDS.get)
def test_project_points_activations_and_dtypes(activation, act_dtype, out_dtype):
    """Every activation, the pre-activation and output dtypes independent of e's."""
    N, K, widths = 129, 17, [3, 130, 64]
    for dtype in DTYPES:
        e = _e(N, K, dtype)
        offsets, scales, acts, activations = _points(N, widths, dtype, act_dtype, [activation] * 3)
        got, want = _run_points(e, None, offsets, widths, scales, acts, activations, out_dtype)
        for l, (g, w) in enumerate(zip(got, want)):
            _close(g, w, _atol(e, K, 2.0 * scales[l]), out_dtype, f"{dtype} point {l}")


@pytest.mark.parametrize("b_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_project_points_materialized_b_dtype(b_dtype):
    """B in another dtype than e, and not contiguous."""
    N, K, widths = 77, 10, [5, 200, 31]
    e = _e(N, K, torch.bfloat16)
    B = torch.randn(sum(widths) + 3, K).to(b_dtype).t()
    offsets, scales, acts, activations = _points(N, widths, torch.bfloat16, torch.float32)
    got, want = _run_points(e, B, offsets, widths, scales, acts, activations, torch.float32)
    for l, (g, w) in enumerate(zip(got, want)):
        _close(g, w, _atol(e, K, 3.0 * scales[l]), torch.float32, f"point {l}")


@pytest.mark.parametrize("storage", ["virtual", "materialized"])
def test_project_points_many_points_shared_layout(storage):
    """More points than one launch takes (32), overlapping columns (shared layout), empty points."""
    N, K = 50, 12
    widths = [(7 * i) % 45 for i in range(70)]  # includes width 0
    e = _e(N, K, torch.float16)
    offsets, scales, acts, activations = _points(N, widths, torch.float16, layout="shared")
    B = reference.feedback_matrix(SEED, "sparse", K, max(widths), DENSITY) if storage == "materialized" else None
    got, want = _run_points(e, B, offsets, widths, scales, acts, activations, torch.float32, "sparse")
    assert len(got) == len(widths)
    for l, (g, w) in enumerate(zip(got, want)):
        _close(g, w, _atol(e, K, 2.0 * scales[l]), torch.float32, f"point {l}")


def test_project_points_split_k():
    """One row and a vocabulary-sized K: few tiles, so K is split and reduced per point."""
    N, K, widths = 2, 50257, [300, 17, 129]
    e = _e(N, K, torch.bfloat16)
    offsets, scales, acts, activations = _points(N, widths, torch.bfloat16, torch.float32)
    got, want = _run_points(e, None, offsets, widths, scales, acts, activations, torch.float32, "gaussian")
    again = torch_ops.project_points(
        e.cuda(),
        None,
        SEED,
        "gaussian",
        DENSITY,
        offsets,
        widths,
        scales,
        [None if a is None else a.cuda() for a in acts],
        activations,
        torch.float32,
    )
    for l, (g, w, a) in enumerate(zip(got, want, again)):
        assert torch.equal(g, a), f"point {l}: split-K sums must be deterministic"
        _close(g, w, _atol(e, K, 2.0 * scales[l]), torch.float32, f"point {l}")


def test_project_points_validation_on_cuda():
    e = _e(4, 3, torch.float32).cuda()
    with pytest.raises(RuntimeError, match=r"act_inputs\[0\] must be on e's device"):
        torch_ops.project_points(e, None, 0, "uniform", 0.1, [0], [5], [1.0], [torch.randn(4, 5)], ["relu"], None)
    with pytest.raises(RuntimeError, match="B must be on the same device as e"):
        torch_ops.project_points(e, torch.randn(3, 5), 0, "uniform", 0.1, [0], [5], [1.0], [None], ["none"], None)


@pytest.mark.parametrize("storage", ["virtual", "materialized"])
def test_project_points_opcheck(storage):
    N, K, widths = 9, 6, [5, 12]
    e = _e(N, K, torch.float32).cuda().requires_grad_()
    B = torch.randn(K, 20, device="cuda", requires_grad=True) if storage == "materialized" else None
    acts = [torch.randn(N, 5, device="cuda", requires_grad=True), torch.randn(N, 12, device="cuda")]
    torch.library.opcheck(
        torch_ops.project_points.default,
        (e, B, SEED, "uniform", DENSITY, [0, 8], widths, [1.0, 0.5], acts, ["tanh", "silu"], None),
    )
    torch.library.opcheck(
        torch_ops.project_points.default,
        (e, B, SEED, "uniform", DENSITY, [0, 8], widths, [1.0, 0.5], [None, acts[1]], ["none", "gelu"], torch.bfloat16),
    )


def test_project_points_gradients():
    N, K, widths = 8, 5, [6, 11]
    e = torch.randn(N, K)
    acts = [torch.randn(N, 6), torch.randn(N, 11)]
    ws = [torch.randn(N, 6), torch.randn(N, 11)]
    grads = {}
    for device in ("cpu", "cuda"):
        x = e.to(device).requires_grad_()
        a = [t.to(device).requires_grad_() for t in acts]
        outs = torch_ops.project_points(
            x, None, SEED, "rademacher", DENSITY, [0, 6], widths, [1.0, 0.5], a, ["sigmoid", "gelu"], None
        )
        loss = sum((o * w.to(device)).sum() for o, w in zip(outs, ws))
        grads[device] = [t.cpu() for t in torch.autograd.grad(loss, [x, *a])]
    for g, w in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ grouped_weight_grad
def _gwg_case(dtype, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(N, O, generator=g).to(dtype) for N, O, _ in shapes]
    inputs = [torch.randn(N, I, generator=g).to(dtype) for N, _, I in shapes]
    return grads, inputs


def _gwg_check(grads, inputs, out_dtype):
    got = torch_ops.grouped_weight_grad([t.cuda() for t in grads], [t.cuda() for t in inputs], out_dtype)
    want = reference.grouped_weight_grad(grads, inputs, out_dtype)
    assert len(got) == len(want)
    for l, (a, b) in enumerate(zip(got, want)):
        N = grads[l].shape[0]
        atol = 1e-4 * math.sqrt(max(N, 1)) * 4
        _close(a, b, atol, b.dtype, f"layer {l}")


@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=lambda d: "same" if d is None else IDS[d])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_grouped_weight_grad_matches_reference(dtype, out_dtype):
    # (N, out, in): shared shapes (one cuBLAS group), odd sizes, N = 0, 1 and an empty side
    shapes = [
        (129, 64, 33),
        (129, 64, 33),
        (129, 17, 1000),
        (1, 3, 7),
        (0, 5, 4),
        (1000, 1, 10),
        (7, 0, 5),
        (129, 64, 33),
    ]
    grads, inputs = _gwg_case(dtype, shapes)
    _gwg_check(grads, inputs, out_dtype)


def test_grouped_weight_grad_strided_and_mixed():
    """Transposed, sliced (misaligned) operands and layers of different dtypes in one call."""
    base = torch.randn(40, 100)
    grads = [torch.randn(30, 40).t(), base[:, 1:18].to(torch.float16), base[:, :9].to(torch.bfloat16)]
    inputs = [base[:, 3:20], torch.randn(40, 13).to(torch.float16), torch.randn(40, 5).to(torch.bfloat16)]
    grads_c = [t.cuda() for t in grads]
    # .cuda() of a view copies it contiguous; slice on the device for a misaligned start
    wide = base.to(torch.float16).cuda()
    grads_c[1] = wide[:, 1:18]
    assert grads_c[1].data_ptr() % 16 != 0
    got = torch_ops.grouped_weight_grad(grads_c, [t.cuda() for t in inputs], torch.float32)
    want = reference.grouped_weight_grad(grads, inputs, torch.float32)
    for l, (a, b) in enumerate(zip(got, want)):
        _close(a, b, 2e-2, torch.float32, f"layer {l}")


def test_grouped_weight_grad_opcheck():
    grads, inputs = _gwg_case(torch.float32, [(9, 4, 6), (9, 4, 6), (5, 3, 2)])
    args = ([t.cuda().requires_grad_() for t in grads], [t.cuda() for t in inputs], None)
    torch.library.opcheck(torch_ops.grouped_weight_grad.default, args)
    grads, inputs = _gwg_case(torch.bfloat16, [(9, 4, 6), (5, 3, 2)])
    torch.library.opcheck(
        torch_ops.grouped_weight_grad.default, ([t.cuda() for t in grads], [t.cuda() for t in inputs], torch.float32)
    )


def test_grouped_weight_grad_gradients():
    grads, inputs = _gwg_case(torch.float32, [(9, 4, 6), (5, 3, 2)])
    results = {}
    for device in ("cpu", "cuda"):
        gs = [t.to(device).requires_grad_() for t in grads]
        xs = [t.to(device).requires_grad_() for t in inputs]
        outs = torch_ops.grouped_weight_grad(gs, xs, None)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
        results[device] = [t.cpu() for t in torch.autograd.grad(loss, gs + xs)]
    for a, b in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
