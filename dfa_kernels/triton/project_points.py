"""Triton project_points: every feedback point's gradient, with the fused activation derivative.

out[l] [N, w_l] = (scale_l * (e @ B[:, off_l : off_l + w_l])) * f_l'(a_l)

The product runs once per column span, the union of the points' column ranges (see
reference.column_spans): one span [0, D) in the independent layout, [0, max d_l) in the shared
one, where every point reads a prefix of B. A program computes one [BM, BN] tile of a span and then
runs the epilogue of every point whose columns meet the tile (scale, f'(a), cast, store), so points
that share columns share the tile's product. One launch per span covers every point, whatever
their activations (a runtime code per point). Per-point data sit in device tables: the plan's
constants (offsets, widths, activation codes, scales) built once and cached, the output and
pre-activation pointers written per call by one small kernel launch (tables.py), never copied
from the host, so a call makes no host-device synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import column_spans
from .hash import as_int32, seed_key_host
from .project import (
    _FLOAT_DTYPES,
    _GPU_CONFIGS,
    _INTERPRET_META,
    _NARROW_CONFIGS,
    _NARROW_INTERPRET_META,
    NARROW_MAX_K,
    _check_distribution,
    _check_float_tensor,
    _check_int,
    _fp32_dot_precision,
    _sparse_threshold,
    accumulate_tile,
    narrow_tile,
    tile_of_program,
)
from .tables import cached_table, device_table
from .tuning import INTERPRET, autotuned, device_guard, fit_tiles

# Activation codes, equal to the C++ enum dfa_kernels::Activation (activation.h).
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def activation_grad(a, ACT):
    """f'(a) in fp32, the formulas of activation.h; ACT a constexpr or a runtime code (a uniform
    branch per tile)."""
    if ACT == 1:
        d = tl.where(a > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 3:
        t = 2.0 / (1.0 + tl.exp(-2.0 * a)) - 1.0  # tanh
        d = 1.0 - t * t
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-a))
        d = s * (1.0 - s)
    elif ACT == 5:
        s = 1.0 / (1.0 + tl.exp(-a))
        d = s * (1.0 + a * (1.0 - s))
    else:
        d = tl.full(a.shape, 1.0, tl.float32)
    return d


# Not specialized: P (a loop bound), N (the batch: it masks rows only), the autotuning keys, the
# hash key and threshold. K, span0 and span_w stay specialized as in _project_kernel (vectorized
# loads along K, of stored B at column span0, stores along the span), as do the strides.
@triton.jit(do_not_specialize=["P", "N", "n_bucket", "w_bucket", "skey", "threshold"])
def _points_kernel(
    e_ptr,
    b_ptr,
    ptr_tab,
    meta_tab,
    scale_tab,
    P,
    N,
    K,
    span0,
    span_w,
    stride_em,
    stride_ek,
    stride_bk,
    stride_bn,
    skey,
    threshold,
    n_bucket,
    w_bucket,
    VIRTUAL: tl.constexpr,
    DIST: tl.constexpr,
    HAS_ACT: tl.constexpr,
    ALIGNED: tl.constexpr,
    NARROW_KP: tl.constexpr,
    HINTS: tl.constexpr,
    OUT_TYPE: tl.constexpr,
    ACT_TYPE: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # Tables: ptr_tab [2P] (outputs, then pre-activations or 0), meta_tab [3P] (column offsets,
    # widths, activation codes), scale_tab [P]. n_bucket and w_bucket are only autotuning keys.
    pid_n, offs_m, offs_n, m_mask, n_mask = tile_of_program(N, span_w, BM, BN)
    if NARROW_KP > 0:
        acc = narrow_tile(
            e_ptr,
            b_ptr,
            K,
            span0,
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
            NARROW_KP,
            BM,
            BN,
        )
    else:
        acc = accumulate_tile(
            e_ptr,
            b_ptr,
            N,
            K,
            span0,
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
            ALIGNED,
            LIBDEVICE,
            INPUT_PRECISION,
            BM,
            BN,
            BK,
        )
    c0 = span0 + pid_n * BN  # the tile's first column of B
    cols = span0 + offs_n
    for p in range(P):
        off = tl.load(meta_tab + p)
        w = tl.load(meta_tab + P + p)
        if HINTS:  # every offset and width a multiple of 16, every pointer 16-byte aligned
            off = tl.multiple_of(off, 16)
            w = tl.multiple_of(w, 16)
        if (off < c0 + BN) & (off + w > c0):  # the point reads some of the tile's columns
            local = cols - off  # the point's own columns
            mask = m_mask[:, None] & ((local >= 0) & (local < w) & n_mask)[None, :]
            idx = offs_m[:, None].to(tl.int64) * w + local[None, :]  # outputs and pre-activations are [N, w]
            out_ptr = tl.load(ptr_tab + p).to(tl.pointer_type(OUT_TYPE))
            if HINTS:
                out_ptr = tl.multiple_of(out_ptr, 16)
            v = acc * tl.load(scale_tab + p)
            if HAS_ACT:
                code = tl.load(meta_tab + 2 * P + p)
                if code != 0:
                    act_ptr = tl.load(ptr_tab + P + p).to(tl.pointer_type(ACT_TYPE))
                    if HINTS:
                        act_ptr = tl.multiple_of(act_ptr, 16)
                    pre = tl.load(act_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                    v = v * activation_grad(pre, code)
            tl.store(out_ptr + idx, v.to(OUT_TYPE), mask=mask)


def prune_points(configs, named_args, **kwargs):
    """No tile past the problem (a span of 17 columns does not tune 128-wide tiles)."""
    return fit_tiles(configs, BM=named_args["N"], BN=named_args["span_w"], BK=named_args["K"])


_KEY = ["n_bucket", "w_bucket", "K", "VIRTUAL", "DIST", "HAS_ACT", "ALIGNED", "NARROW_KP", "INPUT_PRECISION"]
# The narrow path (K <= 16) runs rank-1 updates: the memory-bound tiles of the narrow projection (BK unused).
_NARROW_POINT_CONFIGS = [triton.Config({**c.kwargs, "BK": 16}, num_warps=c.num_warps) for c in _NARROW_CONFIGS]
_points_launch = autotuned("points", _points_kernel, _GPU_CONFIGS, _KEY, _INTERPRET_META, prune_points)
_narrow_points_launch = autotuned(
    "narrow_points", _points_kernel, _NARROW_POINT_CONFIGS, _KEY, {**_NARROW_INTERPRET_META, "BK": 16}, prune_points
)


def _check_points(e, offsets, widths, scales, act_inputs, activations):
    count = len(offsets)
    if not len(widths) == len(scales) == len(act_inputs) == len(activations) == count:
        raise ValueError(
            f"offsets, widths, scales, act_inputs and activations need one entry per point; got "
            f"{count}, {len(widths)}, {len(scales)}, {len(act_inputs)} and {len(activations)}"
        )
    for l in range(count):
        _check_int(f"offsets[{l}]", offsets[l], 0, 1 << 32)
        _check_int(f"widths[{l}]", widths[l], 0, (1 << 32) - offsets[l] + 1)
        if activations[l] not in ACTIVATION_CODES:
            raise ValueError(f"activations[{l}] must be one of {tuple(ACTIVATION_CODES)}, got {activations[l]!r}")
        a = act_inputs[l]
        if activations[l] == "none":
            if a is not None:
                raise ValueError(f"act_inputs[{l}] must be None when activations[{l}] is 'none'")
            continue
        if a is None:
            raise ValueError(
                f"act_inputs[{l}] (the pre-activation [N, {widths[l]}]) is required for activation {activations[l]!r}"
            )
        _check_float_tensor(f"act_inputs[{l}]", a, 2)
        if tuple(a.shape) != (e.shape[0], widths[l]) or a.device != e.device:
            raise ValueError(
                f"act_inputs[{l}] must have shape [N, widths[{l}]] = [{e.shape[0]}, {widths[l]}] on "
                f"{e.device}, got {tuple(a.shape)} on {a.device}"
            )


def project_points(
    e: torch.Tensor,
    B: torch.Tensor | None,
    seed: int,
    distribution: str,
    density: float,
    offsets,
    widths,
    scales,
    act_inputs,
    activations,
    out_dtype=None,
) -> list[torch.Tensor]:
    """Every point's (scaled, activation-weighted) slice of e @ B; same arguments as the op.

    Pre-activations of differing dtypes are read in the first one's dtype (converted).
    """
    _check_float_tensor("e", e, 2)
    seed = _check_int("seed", seed, 0, 1 << 32)
    dist = _check_distribution(distribution)
    threshold = _sparse_threshold(density)
    offsets, widths, scales = [int(o) for o in offsets], [int(w) for w in widths], [float(s) for s in scales]
    act_inputs, activations = list(act_inputs), list(activations)
    _check_points(e, offsets, widths, scales, act_inputs, activations)
    if B is not None:
        _check_float_tensor("B", B, 2)
        if B.shape[0] != e.shape[1] or B.device != e.device:
            raise ValueError(
                f"B must be [e.shape[1] = {e.shape[1]}, *] on {e.device}, got {tuple(B.shape)} on {B.device}"
            )
        if any(o + w > B.shape[1] for o, w in zip(offsets, widths)):
            raise ValueError(f"B has {B.shape[1]} columns, fewer than the points read")
    out_dtype = e.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    N, K = e.shape
    outs = [(torch.zeros if K == 0 else torch.empty)((N, w), dtype=out_dtype, device=e.device) for w in widths]
    live = [l for l, w in enumerate(widths) if w > 0]
    if N == 0 or K == 0 or not live:
        return outs

    device = e.device
    pre = {l: act_inputs[l].contiguous() for l in live if activations[l] != "none"}
    act_dtype = next(iter(pre.values())).dtype if pre else torch.float32
    pre = {l: a.to(act_dtype) for l, a in pre.items()}
    meta = cached_table(
        [offsets[l] for l in live] + [widths[l] for l in live] + [ACTIVATION_CODES[activations[l]] for l in live],
        torch.int64,
        device,
    )
    scale_tab = cached_table([scales[l] for l in live], torch.float32, device)
    pointers = [outs[l].data_ptr() for l in live] + [pre[l].data_ptr() if l in pre else 0 for l in live]
    ptr_tab = device_table(pointers, torch.int64, device)
    hints = all(offsets[l] % 16 == 0 and widths[l] % 16 == 0 for l in live) and all(ptr % 16 == 0 for ptr in pointers)
    narrow_kp = triton.next_power_of_2(K) if K <= NARROW_MAX_K else 0
    launch = _narrow_points_launch if narrow_kp else _points_launch
    for start, stop in column_spans([offsets[l] for l in live], [widths[l] for l in live]):
        span_w = stop - start
        args = (
            e,
            e if B is None else B,
            ptr_tab,
            meta,
            scale_tab,
            len(live),
            N,
            K,
            start,
            span_w,
            e.stride(0),
            e.stride(1),
            0 if B is None else B.stride(0),
            0 if B is None else B.stride(1),
            as_int32(seed_key_host(seed)),
            threshold,
            triton.next_power_of_2(N),
            triton.next_power_of_2(span_w),
        )
        consts = dict(
            VIRTUAL=B is None,
            DIST=dist,
            HAS_ACT=bool(pre),
            ALIGNED=B is None and dist == 2 and start % 32 == 0,
            NARROW_KP=narrow_kp,
            HINTS=hints,
            OUT_TYPE=_TL_DTYPES[out_dtype],
            ACT_TYPE=_TL_DTYPES[act_dtype],
            LIBDEVICE=not INTERPRET,
            INPUT_PRECISION=_fp32_dot_precision(),
        )

        def grid(meta, span_w=span_w):
            return (triton.cdiv(N, meta["BM"]) * triton.cdiv(span_w, meta["BN"]),)

        with device_guard(device):
            launch[grid](*args, **consts)
    return outs
