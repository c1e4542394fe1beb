"""Triton kernels for the DFA feedback projection F = scale * (e @ B) * col_scale.

The virtual kernel never stores B: each program generates the [BK, BN] tile of B it needs in
registers from the counter-based hash (hash.py) and feeds it to ``tl.dot``. The materialized
kernel is the same matmul reading B from memory. ``feedback_matrix`` writes B itself.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
import triton
import triton.language as tl

from .hash import (
    DISTRIBUTION_CODES,
    RADEMACHER,
    as_int32,
    col_key,
    col_key_for,
    rademacher_tile,
    row_key,
    seed_key_host,
    value_from_keys,
)
from .tuning import INTERPRET, autotuned, device_guard, fit_tiles

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def tile_of_program(N, W, BM: tl.constexpr, BN: tl.constexpr):
    """This program's [BM, BN] tile of an [N, W] output: 1-D grid, row-major over tiles (no 65535
    limit on either side), so neighbouring programs share the rows of e they read."""
    num_n = tl.cdiv(W, BN)
    pid_n = tl.program_id(0) % num_n
    offs_m = (tl.program_id(0) // num_n) * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return pid_n, offs_m, offs_n, offs_m < N, offs_n < W


@triton.jit
def store_tile(acc, cs_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, scale, HAS_COL_SCALE: tl.constexpr):
    """out = (acc * scale) * col_scale, cast to out's dtype."""
    acc = acc * scale
    if HAS_COL_SCALE:
        acc = acc * tl.load(cs_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def accumulate_tile(
    e_ptr,
    b_ptr,
    N,
    K,
    col0,
    pid_n,
    offs_m,
    offs_n,
    n_mask,
    stride_em,
    stride_ek,
    stride_bk,
    stride_bn,
    skey,
    threshold,
    VIRTUAL: tl.constexpr,
    DIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """fp32 [BM, BN] tile of e[offs_m, :] @ B[:, col0 + offs_n]; offs_n = pid_n * BN + arange(BN),
    n_mask the columns that exist (stored B is read only there).
    Virtual B is generated from the hash; ALIGNED (rademacher) says col0 is a multiple of 32, so
    the tile starts on a hash word and takes 32 entries per word."""
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < N
    e_ptrs = e_ptr + offs_m[:, None].to(tl.int64) * stride_em + offs_k[None, :] * stride_ek
    j = (col0 + offs_n).to(tl.uint32)  # the columns of B
    if VIRTUAL:
        skey_u = skey.to(tl.uint32)
        # Column keys depend only on this program's columns: hoisted out of the K loop.
        if DIST == RADEMACHER and ALIGNED:
            ckey = col_key(((col0 // 32) + pid_n * (BN // 32) + tl.arange(0, BN // 32)).to(tl.uint32))
        elif DIST == RADEMACHER:
            ckey = col_key(j >> 5)
        else:
            ckey = col_key(j)
    else:
        b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + (col0 + offs_n)[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_mask = offs_k < K - k0
        a = tl.load(e_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if VIRTUAL:
            # Rows past K are left unmasked: they meet zero columns of `a` and B is finite.
            rkey = row_key(skey_u, (k0 + offs_k).to(tl.uint32))
            if DIST == RADEMACHER and ALIGNED:
                b = rademacher_tile(rkey, ckey, BK, BN)
            else:
                b = value_from_keys(rkey[:, None], ckey[None, :], j[None, :], threshold, DIST, LIBDEVICE)
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            b_ptrs += BK * stride_bk
        acc = tl.dot(a, b.to(e_ptr.dtype.element_ty), acc, input_precision=INPUT_PRECISION)
        e_ptrs += BK * stride_ek
    return acc


# Not specialized (each new value would compile anew, for no gain): N (the batch: it only masks
# rows, never the contiguous axis), n_bucket (an autotuning key), the hash key and threshold.
# K and W stay specialized: their divisibility by 16 lets the masked loads of e along K and the
# stores along W vectorize; the strides, for the same reason.
@triton.jit(do_not_specialize=["N", "n_bucket", "skey", "threshold"])
def _project_kernel(
    e_ptr,
    b_ptr,
    cs_ptr,
    out_ptr,
    N,
    K,
    W,
    stride_em,
    stride_ek,
    stride_bk,
    stride_bn,
    stride_om,
    skey,
    threshold,
    scale,
    n_bucket,
    VIRTUAL: tl.constexpr,
    DIST: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # n_bucket is only an autotuning key (N rounded up to a power of two).
    pid_n, offs_m, offs_n, m_mask, n_mask = tile_of_program(N, W, BM, BN)
    # BN is a multiple of 32 and the columns start at 0: rademacher tiles are word aligned.
    acc = accumulate_tile(
        e_ptr,
        b_ptr,
        N,
        K,
        0,
        pid_n,
        offs_m,
        offs_n,
        n_mask,
        stride_em,
        stride_ek,
        stride_bk,
        stride_bn,
        skey,
        threshold,
        VIRTUAL,
        DIST,
        True,
        LIBDEVICE,
        INPUT_PRECISION,
        BM,
        BN,
        BK,
    )
    store_tile(acc, cs_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, scale, HAS_COL_SCALE)


@triton.jit
def narrow_tile(
    e_ptr,
    b_ptr,
    K,
    col0,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    stride_em,
    stride_ek,
    stride_bk,
    stride_bn,
    skey,
    threshold,
    VIRTUAL: tl.constexpr,
    DIST: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    KP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """fp32 [BM, BN] tile of e[offs_m, :] @ B[:, col0 + offs_n] for K <= KP <= 16: an outer product,
    bound by the output write. The K rows of the B block are made once (no tl.dot, whose 16-row
    minimum would generate 16x the entries for K = 1) and added as K rank-1 updates."""
    j = (col0 + offs_n).to(tl.uint32)
    if VIRTUAL:
        ckey = col_key_for(j, DIST)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.static_range(KP):
        if k < K:
            a = tl.load(e_ptr + offs_m.to(tl.int64) * stride_em + k * stride_ek, mask=m_mask, other=0.0)
            if VIRTUAL:
                b = value_from_keys(
                    row_key(skey.to(tl.uint32), tl.full((), k, tl.uint32)), ckey, j, threshold, DIST, LIBDEVICE
                )
            else:
                b = tl.load(b_ptr + k * stride_bk + (col0 + offs_n).to(tl.int64) * stride_bn, mask=n_mask, other=0.0)
            acc += a.to(tl.float32)[:, None] * b.to(e_ptr.dtype.element_ty).to(tl.float32)[None, :]
    return acc


# As _project_kernel; K too, as it only bounds the unrolled k loop (a scalar compare).
@triton.jit(do_not_specialize=["N", "K", "n_bucket", "skey", "threshold"])
def _narrow_kernel(
    e_ptr,
    b_ptr,
    cs_ptr,
    out_ptr,
    N,
    K,
    W,
    stride_em,
    stride_ek,
    stride_bk,
    stride_bn,
    stride_om,
    skey,
    threshold,
    scale,
    n_bucket,
    VIRTUAL: tl.constexpr,
    DIST: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    KP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """out_features K <= KP <= 16 (see narrow_tile)."""
    pid_n, offs_m, offs_n, m_mask, n_mask = tile_of_program(N, W, BM, BN)
    acc = narrow_tile(
        e_ptr,
        b_ptr,
        K,
        0,
        offs_m,
        offs_n,
        m_mask,
        n_mask,
        stride_em,
        stride_ek,
        stride_bk,
        stride_bn,
        skey,
        threshold,
        VIRTUAL,
        DIST,
        LIBDEVICE,
        KP,
        BM,
        BN,
    )
    store_tile(acc, cs_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, scale, HAS_COL_SCALE)


# R only masks rows; C (the stores along the contiguous axis) and stride_r stay specialized.
@triton.jit(do_not_specialize=["R", "skey", "threshold", "col_offset"])
def _feedback_kernel(
    out_ptr,
    R,
    C,
    stride_r,
    skey,
    threshold,
    col_offset,
    DIST: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    num_c = tl.cdiv(C, BC)
    offs_r = (tl.program_id(0) // num_c) * BR + tl.arange(0, BR)
    offs_c = (tl.program_id(0) % num_c) * BC + tl.arange(0, BC)
    rkey = row_key(skey.to(tl.uint32), offs_r.to(tl.uint32))
    # Column indices wrap in uint32 like the header's; any col_offset works, aligned or not.
    j = col_offset.to(tl.uint32) + offs_c.to(tl.uint32)
    v = value_from_keys(rkey[:, None], col_key_for(j, DIST)[None, :], j[None, :], threshold, DIST, LIBDEVICE)
    ptrs = out_ptr + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :]
    tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=(offs_r < R)[:, None] & (offs_c < C)[None, :])


# Every BN is a multiple of 32 (rademacher tiles start on hash-word boundaries) and every tile
# dimension is >= 16 (tl.dot).
_GPU_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (32, 64, 64, 4, 4),
        (32, 32, 32, 4, 4),
    ]
]
# The interpreter's config: a deep BK keeps the K loop short, as its cost is per operation, not
# per element.
_INTERPRET_META = {"BM": 32, "BN": 64, "BK": 128}


def prune_project(configs, named_args, **kwargs):
    """No tile past the problem (N = 8 on BM = 128 wastes the tile and the tuning time)."""
    return fit_tiles(configs, BM=named_args["N"], BN=named_args["W"], BK=named_args["K"])


# Memory-bound tiles for the narrow kernel: wide in columns for long coalesced stores.
_NARROW_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w)
    for bm, bn, w in [(32, 256, 4), (64, 256, 8), (16, 512, 4), (64, 128, 4), (128, 128, 8)]
]
_NARROW_INTERPRET_META = {"BM": 32, "BN": 64}
NARROW_MAX_K = 16


def prune_narrow(configs, named_args, **kwargs):
    """No tile past the problem: W = 17 does not tune 512-column tiles."""
    return fit_tiles(configs, BM=named_args["N"], BN=named_args["W"])


_project_launch = autotuned(
    "project",
    _project_kernel,
    _GPU_CONFIGS,
    ["n_bucket", "K", "W", "VIRTUAL", "DIST", "HAS_COL_SCALE", "INPUT_PRECISION"],
    _INTERPRET_META,
    prune_project,
)
_narrow_launch = autotuned(
    "narrow",
    _narrow_kernel,
    _NARROW_CONFIGS,
    ["n_bucket", "K", "W", "VIRTUAL", "DIST", "HAS_COL_SCALE"],
    _NARROW_INTERPRET_META,
    prune_narrow,
)


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # Python or NumPy integers
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < lo or (hi is not None and value >= hi):
        bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_distribution(distribution) -> int:
    if distribution not in DISTRIBUTION_CODES:
        raise ValueError(f"distribution must be one of {tuple(DISTRIBUTION_CODES)}, got {distribution!r}")
    return DISTRIBUTION_CODES[distribution]


def _sparse_threshold(density) -> int:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float, got {type(density).__name__}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return int(math.floor(density * 16777216.0 + 0.5))


def _check_device(name: str, device: torch.device) -> None:
    if device.type != ("cpu" if INTERPRET else "cuda"):
        mode = "under TRITON_INTERPRET=1, on CPU tensors" if INTERPRET else "compiled, on CUDA tensors"
        raise ValueError(f"{name} is on {device}, but the Triton kernels run {mode}")


def _check_float_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    _check_device(name, t.device)


def _grid(N: int, width: int, meta) -> tuple[int]:
    return (triton.cdiv(N, meta["BM"]) * triton.cdiv(width, meta["BN"]),)


def _fp32_dot_precision() -> str:
    """How tl.dot multiplies fp32 operands (16-bit ones ignore it), after torch's matmul setting:
    "highest" keeps fp32 accuracy, on NVIDIA tensor cores as 3xTF32 (relative error ~1e-6; Triton's
    IEEE fp32 dot runs on FMAs and spills registers at useful tile sizes); lower settings use TF32."""
    if INTERPRET or torch.version.hip:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _launch(
    e: torch.Tensor,
    B: torch.Tensor | None,
    width: int,
    skey: int,
    threshold: int,
    dist: int,
    scale,
    col_scale,
    out_dtype,
) -> torch.Tensor:
    """Shared validation of scale/col_scale/out_dtype and the launch of _project_kernel."""
    N, K = e.shape
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    out_dtype = e.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if col_scale is not None:
        _check_float_tensor("col_scale", col_scale, 1)
        if col_scale.device != e.device:
            raise ValueError(f"col_scale must be on e's device {e.device}, got {col_scale.device}")
        if col_scale.shape[0] != width:
            raise ValueError(f"col_scale must have {width} entries (the width), got {col_scale.shape[0]}")
        col_scale = col_scale.to(torch.float32).contiguous()
    if N == 0 or width == 0:
        return torch.empty((N, width), dtype=out_dtype, device=e.device)
    if K == 0:
        return torch.zeros((N, width), dtype=out_dtype, device=e.device)

    out = torch.empty((N, width), dtype=out_dtype, device=e.device)
    args = (
        e,
        e if B is None else B,
        out if col_scale is None else col_scale,
        out,
        N,
        K,
        width,
        e.stride(0),
        e.stride(1),
        0 if B is None else B.stride(0),
        0 if B is None else B.stride(1),
        out.stride(0),
        skey,
        threshold,
        float(scale),
        triton.next_power_of_2(N),
    )
    consts = dict(VIRTUAL=B is None, DIST=dist, HAS_COL_SCALE=col_scale is not None, LIBDEVICE=not INTERPRET)
    if K <= NARROW_MAX_K:
        launch = _narrow_launch
        consts["KP"] = triton.next_power_of_2(K)
    else:
        launch = _project_launch
        consts["INPUT_PRECISION"] = _fp32_dot_precision()
    with device_guard(e.device):
        launch[lambda meta: _grid(N, width, meta)](*args, **consts)
    return out


def project(
    e: torch.Tensor,
    seed: int,
    distribution: str,
    density: float,
    width: int,
    scale: float = 1.0,
    col_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """F[N, width] = scale * (e @ B) * col_scale with B[i, j] = dist(hash(seed, i, j)) never stored.

    e: [N, out_features] float32/float16/bfloat16. B entries are generated in fp32 and cast to
    e's dtype for tl.dot; accumulation is fp32. col_scale: optional fp32 [width]; out_dtype
    defaults to e's dtype.
    """
    _check_float_tensor("e", e, 2)
    seed = _check_int("seed", seed, 0, 1 << 32)
    dist = _check_distribution(distribution)
    threshold = _sparse_threshold(density)
    width = _check_int("width", width, 0)
    return _launch(e, None, width, as_int32(seed_key_host(seed)), threshold, dist, scale, col_scale, out_dtype)


def project_materialized(
    e: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    col_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """F = scale * (e @ B) * col_scale with B [out_features, width] read from memory (cast to e's dtype)."""
    _check_float_tensor("e", e, 2)
    _check_float_tensor("B", B, 2)
    if B.shape[0] != e.shape[1]:
        raise ValueError(f"B must have e.shape[1] = {e.shape[1]} rows, got shape {tuple(B.shape)}")
    if B.device != e.device:
        raise ValueError(f"B must be on e's device {e.device}, got {B.device}")
    return _launch(e, B, B.shape[1], 0, 0, 0, scale, col_scale, out_dtype)


def feedback_matrix(
    seed: int,
    distribution: str,
    density: float,
    rows: int,
    cols: int,
    dtype: torch.dtype = torch.float32,
    device="cuda",
    col_offset: int = 0,
) -> torch.Tensor:
    """B[i, j] for i < rows and col_offset <= j < col_offset + cols, as a dense [rows, cols] tensor."""
    seed = _check_int("seed", seed, 0, 1 << 32)
    dist = _check_distribution(distribution)
    threshold = _sparse_threshold(density)
    rows = _check_int("rows", rows, 0, 1 << 31)
    cols = _check_int("cols", cols, 0, 1 << 31)
    col_offset = _check_int("col_offset", col_offset, 0, (1 << 32) - cols + 1)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    device = torch.device(device)
    _check_device("device", device)
    out = torch.empty((rows, cols), dtype=dtype, device=device)
    if rows == 0 or cols == 0:
        return out
    BR, BC = 32, 128
    grid = (triton.cdiv(rows, BR) * triton.cdiv(cols, BC),)
    with device_guard(device):
        _feedback_kernel[grid](
            out,
            rows,
            cols,
            out.stride(0),
            as_int32(seed_key_host(seed)),
            threshold,
            as_int32(col_offset),
            DIST=dist,
            LIBDEVICE=not INTERPRET,
            BR=BR,
            BC=BC,
            num_warps=4,
        )
    return out
