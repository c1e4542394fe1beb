"""The CUDA kernels' device code, run on the CPU under sanitizers (tests/cuda_on_cpu/, emu_harness.py).

Every kernel of csrc/include/dfa_kernels/cuda/ runs through the same launch sequence and plans as on a
GPU (the SM count is a parameter: 132 as an H100, small to force split-K), on the emulator's host
threads, built with ASan + UBSan (bounds, alignment, undefined behaviour) and TSan (missing barriers:
two threads of a block, or two blocks, touching the same memory unordered). Outputs are compared with
the CPU ops (the same B values, fp32 accumulation in another order) or, on the tensor-core path, with
a float64 product of e and B rounded to e's dtype (as that kernel rounds it).

What this cannot show: tensor-core rounding, speed, register pressure, streams; a GPU run does
(scripts/gpu_check.sh). Skipped, with the reason, where no host compiler or CUDA headers are found.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import shutil

import emu_harness as emu
import pytest
import torch

from dfa_kernels import reference

TOOLS = emu.toolchain()
pytestmark = pytest.mark.skipif(isinstance(TOOLS, str), reason=f"CUDA-on-CPU harness: {TOOLS}")

ops = torch.ops.dfa_kernels
SEED, DENSITY = 1234, 0.25
H100_SMS = 132
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def asan(tmp_path_factory):
    return emu.build("asan", tmp_path_factory.mktemp("asan"))


@pytest.fixture(scope="module")
def tsan(tmp_path_factory):
    return emu.build("tsan", tmp_path_factory.mktemp("tsan"))


def _e(N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g).to(dtype)


def _rms(t):
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _atol(e, K, scale=1.0, b_rms=1.0):
    """fp32 accumulation of a length-K product, in two different orders."""
    return 4e-6 * math.sqrt(max(K, 1)) * _rms(e) * b_rms * abs(scale) + 1e-6


class Checks:
    """Cases of one harness run, each with the values it must produce."""

    def __init__(self, run: emu.Run):
        self.run = run
        self.expect = []  # (case, output name, expected tensor, atol, what)

    def want(self, case, expected, atol, what, name="out"):
        self.expect.append((case, name, expected, atol, what))

    def verify(self, binary):
        self.run.run(binary)
        for case, name, expected, atol, what in self.expect:
            got = case.output(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, (what, got.dtype, got.shape)
            torch.testing.assert_close(
                got.double(),
                expected.double(),
                atol=atol,
                rtol=RTOL.get(expected.dtype, 0.0),
                msg=lambda m, what=what, case=case: f"{what} ({case.id}, plan {case.result}): {m}",
            )
        return self


def kernel_name(launch) -> str:
    """'project_tc_kernel' of 'void dfa_kernels::(anonymous namespace)::project_tc_kernel<__half>(...)'."""
    match = re.search(r"(\w+_kernel)\b", launch["kernel"])
    return match.group(1) if match else launch["kernel"]


# ------------------------------------------------------------------ project (virtual B)
def add_project(
    c: Checks, N, K, W, dtype, dist, out_dtype=None, *, col_scale=False, sms=H100_SMS, cc_major=9, misalign=0, scale=0.5
):
    out_dtype = out_dtype or dtype
    e = _e(N, K, dtype, seed=N * 7 + K)
    cs = torch.rand(W, generator=torch.Generator().manual_seed(W)) + 0.5 if col_scale else None
    inputs = {"e": e} | ({"col_scale": cs} if cs is not None else {})
    case = c.run.add(
        "project",
        inputs,
        {"out": (out_dtype, (N, W))},
        N=N,
        K=K,
        W=W,
        e_kind=emu.KIND[dtype],
        out_kind=emu.KIND[out_dtype],
        seed=SEED,
        dist=dist,
        density=DENSITY,
        scale=scale,
        sms=sms,
        cc_major=cc_major,
        misalign=misalign,
    )
    tensor_cores = dtype != torch.float32 and cc_major >= 8 and K > 16
    atol = _atol(e, K, scale * (1.5 if cs is not None else 1.0))
    if tensor_cores:  # the kernel rounds B to e's dtype; float64 product of the rounded values
        B = ops.feedback_matrix(SEED, dist, DENSITY, K, W, dtype, "cpu").double()
        want = (e.double() @ B) * scale
        if cs is not None:
            want = want * cs.double()
        want = want.to(out_dtype)
        if dist == "gaussian":  # its fp32 values agree only to ~1e-7 |z| (hash.h), so a rare entry rounds
            atol += 8 * torch.finfo(dtype).eps * float(e.abs().max()) * 4 * scale * 1.5  # the other way in 16 bits
    else:
        want = ops.project(e, SEED, dist, DENSITY, W, scale, cs, out_dtype)
    c.want(
        case,
        want,
        atol,
        f"project N={N} K={K} W={W} {dtype}->{out_dtype} {dist} cc{cc_major} sms={sms} misalign={misalign}",
    )
    return case


def project_suite(c: Checks, full=True):
    """Every path (narrow, SIMT fp32, SIMT 16-bit on sm_7x, tensor cores with and without e padding,
    aligned and misaligned e), split-K on and off, every distribution, ragged tiles. full=False: one
    small case per path and split-K (TSan runs each thread ~10x slower)."""
    if not full:
        return [
            add_project(c, 70, 16, 256, torch.float32, "uniform"),
            add_project(c, 7, 3, 130, torch.float16, "sparse"),
            add_project(c, 70, 40, 130, torch.float32, "gaussian"),
            add_project(c, 1, 17, 37, torch.float32, "uniform"),
            add_project(c, 5, 512, 130, torch.float32, "rademacher", sms=4),
            add_project(c, 7, 17, 37, torch.bfloat16, "uniform"),
            add_project(c, 129, 40, 130, torch.float16, "rademacher"),
            add_project(c, 64, 512, 64, torch.float16, "gaussian", sms=4),
        ]
    cases = []
    for dist in reference.DISTRIBUTIONS:
        for N, K, W in [(1, 1, 37), (7, 3, 130), (70, 16, 256), (129, 10, 1), (300, 4, 513)]:  # narrow
            cases.append(add_project(c, N, K, W, torch.float16 if N == 7 else torch.float32, dist))
        for N, K, W in [(1, 17, 37), (70, 40, 130), (129, 300, 256), (5, 1000, 130)]:  # SIMT (tm 1/8/8/1), split-K
            cases.append(add_project(c, N, K, W, torch.float32, dist))
        cases.append(add_project(c, 33, 600, 70, torch.bfloat16, dist, torch.float32, cc_major=7))  # SIMT, 16-bit
        for N, K, W, dtype in [
            (129, 40, 130, torch.float16),
            (7, 17, 37, torch.bfloat16),
            (130, 520, 131, torch.float16),
        ]:  # tensor cores: padded e (17), split-K (520)
            cases.append(add_project(c, N, K, W, dtype, dist))
    for dtype in (torch.float16, torch.bfloat16):
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            cases.append(add_project(c, 130, 64, 131, dtype, "gaussian", out_dtype, col_scale=True))
        cases.append(add_project(c, 130, 64, 256, dtype, "uniform", misalign=1))  # scalar e loads
        cases.append(add_project(c, 64, 768, 64, dtype, "sparse", sms=4))  # few SMs: split-K on tensor cores
    for out_dtype in (torch.float16, torch.bfloat16):
        cases.append(add_project(c, 9, 5, 1000, torch.float32, "uniform", out_dtype, col_scale=True))
        cases.append(add_project(c, 40, 700, 515, torch.float32, "sparse", out_dtype, col_scale=True, sms=8))
    return cases


def test_project_every_path(asan, tmp_path):
    c = Checks(emu.Run(tmp_path))
    cases = project_suite(c)
    c.verify(asan)
    paths = {case.result["path"] for case in cases}
    assert paths == {"narrow", "simt", "tensor_core"}, paths
    split = [case for case in cases if case.result.get("splits", 1) > 1]
    assert {case.result["path"] for case in split} == {"simt", "tensor_core"}, "split-K must run on both GEMM paths"
    assert all(any(kernel_name(l) == "epilogue_kernel" for l in case.result["launches"]) for case in split)
    assert any(case.result.get("lde", 0) != int(case.fields["K"]) for case in cases), "e padding never exercised"


# ------------------------------------------------------------------ project_materialized, feedback_matrix
def add_materialized(c: Checks, N, K, W, dtype, b_dtype, out_dtype=None, col_scale=False, scale=0.25):
    out_dtype = out_dtype or dtype
    e = _e(N, K, dtype, seed=K)
    B = torch.randn(K, W, generator=torch.Generator().manual_seed(W)).to(b_dtype)
    cs = torch.rand(W) + 0.5 if col_scale else None
    inputs = {"e": e, "B": B} | ({"col_scale": cs} if cs is not None else {})
    case = c.run.add(
        "project_materialized",
        inputs,
        {"out": (out_dtype, (N, W))},
        N=N,
        K=K,
        W=W,
        e_kind=emu.KIND[dtype],
        b_kind=emu.KIND[b_dtype],
        out_kind=emu.KIND[out_dtype],
        scale=scale,
        sms=H100_SMS,
        cc_major=9,
    )
    want = ops.project_materialized(e, B, scale, cs, out_dtype)
    c.want(case, want, _atol(e, K, scale * 1.5, _rms(B)), f"project_materialized N={N} K={K} W={W} {dtype} B {b_dtype}")
    return case


def test_project_materialized_and_feedback_matrix(asan, tmp_path):
    c = Checks(emu.Run(tmp_path))
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b_dtype in (torch.float32, torch.float16, torch.bfloat16):  # the narrow kernel reads any B dtype
            cases.append(add_materialized(c, 77, 10, 131, dtype, b_dtype, col_scale=True))
            cases.append(add_materialized(c, 1, 3, 128, dtype, b_dtype, torch.float32))
        cases.append(add_materialized(c, 33, 40, 131, dtype, dtype))  # cuBLAS, written directly
        cases.append(add_materialized(c, 33, 40, 70, dtype, dtype, col_scale=True))  # cuBLAS + epilogue
        if dtype != torch.float32:
            cases.append(
                add_materialized(
                    c, 33, 40, 70, dtype, dtype, torch.bfloat16 if dtype == torch.float16 else torch.float16
                )
            )  # a 16-bit output of the other type
    for dist in reference.DISTRIBUTIONS:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            rows, cols = (7, 300) if dtype == torch.float32 else (33, 70)
            case = c.run.add(
                "feedback_matrix",
                {},
                {"out": (dtype, (rows, cols))},
                rows=rows,
                cols=cols,
                out_kind=emu.KIND[dtype],
                seed=SEED,
                dist=dist,
                density=DENSITY,
            )
            c.want(
                case,
                ops.feedback_matrix(SEED, dist, DENSITY, rows, cols, dtype, "cpu"),
                1e-6 if dist == "gaussian" else 0.0,
                f"feedback_matrix {dist} {dtype}",
            )
    # a grid clipped at 1024 x 65535 blocks with the grid-stride loops covering the rest
    case = c.run.add(
        "feedback_matrix",
        {},
        {"out": (torch.float32, (9, 40000))},
        rows=9,
        cols=40000,
        out_kind="f32",
        seed=SEED,
        dist="rademacher",
        density=DENSITY,
    )
    c.want(case, ops.feedback_matrix(SEED, "rademacher", DENSITY, 9, 40000, torch.float32, "cpu"), 0.0, "feedback wide")
    c.verify(asan)
    assert {case.result["path"] for case in cases} == {"narrow", "gemm"}
    assert {case.result.get("direct") for case in cases if case.result["path"] == "gemm"} == {True, False}


# ------------------------------------------------------------------ project_points
def add_points(
    c: Checks,
    N,
    K,
    widths,
    dtype,
    *,
    dist="uniform",
    layout="independent",
    stored=None,
    out_dtype=None,
    act_dtype=None,
    activations=None,
    sms=H100_SMS,
):
    out_dtype = out_dtype or dtype
    act_dtype = act_dtype or dtype
    g = torch.Generator().manual_seed(N + K)
    e = _e(N, K, dtype, seed=K)
    offsets = [sum(widths[:i]) for i in range(len(widths))] if layout == "independent" else [0] * len(widths)
    activations = activations or [reference.ACTIVATIONS[i % len(reference.ACTIVATIONS)] for i in range(len(widths))]
    scales = [0.5 + 0.25 * (i % 4) for i in range(len(widths))]
    acts = [
        None if a == "none" else (torch.randn(N, w, generator=g) * 2).to(act_dtype) for a, w in zip(activations, widths)
    ]
    B = None
    inputs = {"e": e}
    fields = {}
    if stored is not None:
        cols = max(o + w for o, w in zip(offsets, widths)) + 3
        B = ops.feedback_matrix(SEED, dist, DENSITY, K, cols, torch.float32, "cpu").to(stored)
        inputs["B"] = B
        fields = {"b_kind": emu.KIND[stored], "ldb": cols}
    case_id = f"c{len(c.run.cases)}"
    act_files = ["-" if a is None else c.run.input(case_id, f"act{l}", a) for l, a in enumerate(acts)]
    outputs = {f"out{l}": (out_dtype, (N, w)) for l, w in enumerate(widths)}
    case = c.run.add(
        "project_points",
        inputs,
        outputs,
        N=N,
        K=K,
        e_kind=emu.KIND[dtype],
        out_kind=emu.KIND[out_dtype],
        seed=SEED,
        dist=dist,
        density=DENSITY,
        offsets=offsets,
        widths=widths,
        scales=scales,
        acts=activations,
        act_kinds=[emu.KIND[act_dtype]] * len(widths),
        act_files=act_files,
        sms=sms,
        cc_major=9,
        **fields,
    )
    case.fields["outs"] = ",".join(str(outputs_path) for outputs_path, _, _ in case.outputs.values())
    want = ops.project_points(e, B, SEED, dist, DENSITY, offsets, widths, scales, acts, activations, out_dtype)
    b_rms = _rms(B) if B is not None else 1.0
    for l, w in enumerate(want):
        c.want(
            case,
            w,
            2 * _atol(e, K, scales[l] * 1.2, b_rms),
            f"project_points N={N} K={K} {dtype} {dist} {layout} B={stored} point {l}",
            name=f"out{l}",
        )
    return case


def points_suite(c: Checks, full=True):
    if not full:
        return [
            add_points(c, 129, 17, [1, 33, 130, 7, 64, 5], torch.float32),
            add_points(c, 9, 12, [(7 * i) % 45 for i in range(70)], torch.float16, dist="sparse", layout="shared"),
            add_points(c, 2, 512, [130, 17], torch.bfloat16, stored=torch.float16, sms=4),
        ]
    cases = [
        add_points(c, 129, 17, [1, 33, 130, 7, 64, 5], torch.float32),
        add_points(c, 7, 40, [3, 130, 64], torch.bfloat16, out_dtype=torch.float32, act_dtype=torch.float16),
        add_points(
            c,
            50,
            12,
            [(7 * i) % 45 for i in range(70)],
            torch.float16,
            dist="sparse",
            layout="shared",
            out_dtype=torch.float32,
        ),  # > 64 points: two chunks; width 0; overlapping columns
        add_points(c, 2, 2000, [300, 17, 129], torch.bfloat16, dist="gaussian", out_dtype=torch.float32),  # split-K
        add_points(c, 77, 10, [5, 200, 31], torch.bfloat16, stored=torch.float32, out_dtype=torch.float32),
    ]
    for stored in (torch.float16, torch.bfloat16):
        cases.append(add_points(c, 33, 600, [64, 19], torch.float32, dist="rademacher", stored=stored, sms=16))
    for act_dtype in (torch.float32, torch.bfloat16):
        cases.append(
            add_points(
                c,
                16,
                9,
                [3, 130, 64, 8],
                torch.float32,
                act_dtype=act_dtype,
                activations=list(reference.ACTIVATIONS[:4]),
            )
        )
    cases.append(
        add_points(c, 60, 1500, [(3 * i) % 20 + 1 for i in range(66)], torch.float32, layout="shared", sms=8)
    )  # split-K with two chunks
    return cases


def test_project_points(asan, tmp_path):
    c = Checks(emu.Run(tmp_path))
    cases = points_suite(c)
    c.verify(asan)
    assert any(span[2] > 1 for case in cases for span in case.result["spans"]), "split-K never exercised"
    chunked = [case for case in cases if len(case.fields["widths"].split(",")) > 64]
    assert all(sum(kernel_name(l) == "project_points_kernel" for l in case.result["launches"]) >= 2 for case in chunked)


# ------------------------------------------------------------------ grouped_weight_grad
def add_grouped(c: Checks, layers, dtype, out_dtype=None, grouped=True):
    """layers: (N, O, I, pad_g, off_g, pad_x, off_x): each operand a view of rows with stride
    cols + pad starting off elements into its buffer (a column slice; an odd off is misaligned)."""
    out_dtype = out_dtype or dtype
    g = torch.Generator().manual_seed(len(layers))
    case_id = f"c{len(c.run.cases)}"
    files, views = {"g": [], "x": []}, {"g": [], "x": []}
    lds, offs = {"g": [], "x": []}, {"g": [], "x": []}
    for l, (N, O, I, pad_g, off_g, pad_x, off_x) in enumerate(layers):
        for name, cols, pad, off in (("g", O, pad_g, off_g), ("x", I, pad_x, off_x)):
            ld = cols + pad
            flat = torch.randn(off + max(N - 1, 0) * ld + cols if N else off, generator=g).to(dtype)
            view = flat[off:].as_strided((N, cols), (ld, 1)) if N else torch.empty(0, cols, dtype=dtype)
            files[name].append(c.run.input(case_id, f"{name}{l}", flat))
            views[name].append(view)
            lds[name].append(ld)
            offs[name].append(off)
    outputs = {f"out{l}": (out_dtype, (O, I)) for l, (N, O, I, *_) in enumerate(layers)}
    case = c.run.add(
        "grouped_weight_grad",
        {},
        outputs,
        N=[lay[0] for lay in layers],
        O=[lay[1] for lay in layers],
        I=[lay[2] for lay in layers],
        ld_g=lds["g"],
        ld_x=lds["x"],
        off_g=offs["g"],
        off_x=offs["x"],
        g=files["g"],
        x=files["x"],
        kind=emu.KIND[dtype],
        out_kind=emu.KIND[out_dtype],
        grouped=int(grouped),
    )
    case.fields["outs"] = ",".join(str(p) for p, _, _ in case.outputs.values())
    want = reference.grouped_weight_grad(views["g"], views["x"], out_dtype)
    for l, w in enumerate(want):
        N = layers[l][0]
        c.want(
            case, w, 4e-6 * math.sqrt(max(N, 1)) * 4 + 1e-6, f"grouped {dtype}->{out_dtype} layer {l}", name=f"out{l}"
        )
    return case


def grouped_suite(c: Checks, full=True):
    shapes = [
        (129, 64, 33, 0, 0, 0, 0),
        (129, 64, 33, 0, 0, 0, 0),
        (129, 17, 100, 0, 0, 0, 0),
        (1, 3, 7, 0, 0, 0, 0),
        (0, 5, 4, 0, 0, 0, 0),
        (100, 1, 10, 0, 0, 0, 0),
        (7, 0, 5, 0, 0, 0, 0),
        (129, 64, 33, 0, 0, 0, 0),
    ]
    strided = [(40, 17, 13, 83, 1, 0, 0), (40, 9, 5, 3, 0, 7, 8), (40, 9, 5, 3, 0, 7, 8)]  # slices, misaligned
    if not full:
        return [add_grouped(c, [(9, 4, 6, 0, 0, 0, 0)] * 3 + [(5, 3, 2, 0, 0, 0, 0)], torch.float32)]
    cases = [add_grouped(c, shapes, torch.float32), add_grouped(c, strided, torch.float16)]
    for dtype in (torch.float16, torch.bfloat16):
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            cases.append(add_grouped(c, shapes[:4], dtype, out_dtype))
    cases.append(add_grouped(c, shapes[:3], torch.float32, grouped=False))  # captured stream: per layer
    cases.append(add_grouped(c, [(3, 2, 2, 0, 0, 0, 0)] * 170, torch.float32))  # 510 pointers: two fill launches
    return cases


def test_grouped_weight_grad(asan, tmp_path):
    c = Checks(emu.Run(tmp_path))
    cases = grouped_suite(c)
    c.verify(asan)
    assert cases[0].result["path"].startswith("grouped"), cases[0].result
    assert cases[1].result["operand_copies"] >= 1, "the misaligned slice must be copied"
    assert sum(kernel_name(l) == "fill_kernel" for l in cases[-1].result["launches"]) == 2


# ------------------------------------------------------------------ TSan: every kernel, fewer shapes
def test_every_kernel_under_tsan(tsan, tmp_path):
    """Missing or misplaced barriers show as data races between a block's threads (or two blocks)."""
    c = Checks(emu.Run(tmp_path))
    cases = project_suite(c, full=False) + points_suite(c, full=False) + grouped_suite(c, full=False)
    c.verify(tsan)
    kernels = {kernel_name(launch) for case in cases for launch in case.result["launches"]}
    assert {
        "project_virtual_kernel",
        "project_tc_kernel",
        "project_narrow_kernel",
        "epilogue_kernel",
        "project_points_kernel",
        "project_points_reduce_kernel",
        "fill_kernel",
    } <= kernels, kernels


# ------------------------------------------------------------------ the harness catches real bugs
# Each mutation is a bug the harness exists for, applied to a copy of the kernel headers: the copy is
# built (only the harness units that include the header, the rest reused), the mutation's cases run,
# and they must fail. The unmutated cases pass on the same build (the other tests, and the check below).
UNITS_OF = {
    "common.cuh": ("harness_project", "harness_points"),
    "project.cuh": ("harness_project",),
    "project_points.cuh": ("harness_points",),
    "gemm.cuh": ("harness_project", "harness_gemm"),
}


def _simt(c):
    return [
        add_project(c, 70, 40, 130, torch.float32, "uniform"),
        add_project(c, 5, 512, 130, torch.float32, "rademacher", sms=4),
    ]


def _narrow(c):
    return [add_project(c, 70, 16, 256, torch.float32, "uniform"), add_project(c, 7, 3, 130, torch.float16, "sparse")]


def _tensor_cores(c):
    return [
        add_project(c, 129, 40, 130, torch.float16, "rademacher"),
        add_project(c, 7, 17, 37, torch.bfloat16, "uniform"),
    ]


def _points(c):
    return [add_points(c, 129, 17, [1, 33, 130, 7, 64, 5], torch.float32)]


def _grouped(c):
    return grouped_suite(c, full=False)


MUTATIONS = {  # name: (header, original, mutated, sanitizer, cases)
    "simt: no barrier after the K step": (
        "common.cuh",
        "      store(cur ^ 1);  // the other buffer was last read before the previous barrier\n    }\n"
        "    __syncthreads();\n",
        "      store(cur ^ 1);  // the other buffer was last read before the previous barrier\n    }\n",
        "tsan",
        _simt,
    ),
    "simt: no row guard on the e tile": (
        "common.cuh",
        "(idx < BM * kSimtBK && r < N && k < k_end)",
        "(idx < BM * kSimtBK && k < k_end)",
        "asan",
        _simt,
    ),
    "split-K: the reduction skips the last slice": (
        "project.cuh",
        "for (int z = 0; z < splits; ++z) s += partial[z * numel + idx];",
        "for (int z = 0; z < splits - 1; ++z) s += partial[z * numel + idx];",
        "asan",
        _simt,
    ),
    "narrow: one row past the block (off by one)": (
        "project.cuh",
        "for (int64_t r = threadIdx.x / 32; r < rows; r += kNarrowThreads / 32)",
        "for (int64_t r = threadIdx.x / 32; r <= rows; r += kNarrowThreads / 32)",
        "asan",
        _narrow,
    ),
    "tensor cores: A fragment one column off": (
        "project.cuh",
        "&sm.tiles.A[cur][wm * 64 + i * 16][kk]",
        "&sm.tiles.A[cur][wm * 64 + i * 16][kk + 1]",
        "asan",
        _tensor_cores,
    ),
    "tensor cores: no __syncwarp before reading the staged fragment": (
        "project.cuh",
        "wmma::store_matrix_sync(stage, acc[i][j], kTcLdC, wmma::mem_row_major);\n      __syncwarp();",
        "wmma::store_matrix_sync(stage, acc[i][j], kTcLdC, wmma::mem_row_major);",
        "tsan",
        _tensor_cores,
    ),
    "points: no width guard on a ragged point": (
        "project_points.cuh",
        "if (q < n && c + q >= 0 && c + q < pt.width)",
        "if (q < n && c + q >= 0)",
        "asan",
        _points,
    ),
    "grouped GEMM: the fill kernel writes one pointer too many": (
        "gemm.cuh",
        "for (int i = threadIdx.x; i < p.count; i += blockDim.x)",
        "for (int i = threadIdx.x; i <= p.count; i += blockDim.x)",
        "asan",
        _grouped,
    ),
}


def _mutant_fails(name, base: dict, tmp) -> str:
    header, original, mutated, variant, cases = MUTATIONS[name]
    include = tmp / "include"
    shutil.copytree(emu.KERNEL_HEADERS, include)
    path = include / "dfa_kernels" / "cuda" / header
    text = path.read_text()
    assert text.count(original) == 1, f"{name}: the original code is no longer in {header} exactly once"
    path.write_text(text.replace(original, mutated))
    binary = emu.build(variant, tmp / "build", headers=include, reuse=base[variant].parent, units=UNITS_OF[header])
    c = Checks(emu.Run(tmp / "run"))
    cases(c)
    try:
        c.verify(binary)
    except AssertionError as caught:
        report = str(caught)
        for marker in ("SUMMARY: ", "runtime error", "cuda_emu:", "Tensor-likes are not close", "host GEMM: rejected"):
            if marker in report:  # what caught it, for the log
                return report[report.index(marker) :].splitlines()[0][:160]
        return report.strip().splitlines()[0][:160]
    return ""


def test_harness_catches_mutations(asan, tsan, tmp_path):
    base = {"asan": asan, "tsan": tsan}
    for variant, cases in {
        ("asan", _simt),
        ("asan", _narrow),
        ("asan", _tensor_cores),
        ("asan", _points),
        ("asan", _grouped),
        ("tsan", _simt),
        ("tsan", _tensor_cores),
    }:
        c = Checks(emu.Run(tmp_path / f"clean_{variant}_{cases.__name__}"))
        cases(c)
        c.verify(base[variant])  # the mutations' cases pass on the unmutated kernels
    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        results = dict(
            zip(
                MUTATIONS,
                pool.map(lambda n: _mutant_fails(n, base, tmp_path / f"m{list(MUTATIONS).index(n)}"), MUTATIONS),
            )
        )
    for name, why in results.items():
        print(f"{name}: {why or 'SURVIVED'}")
    survived = [name for name, why in results.items() if not why]
    assert not survived, f"mutations the harness did not catch: {survived}"
