"""Triton project_points: every feedback point's gradient, with the fused activation derivative.

out[l] [N, w_l] = (scale_l * (e @ B[:, off_l : off_l + w_l])) * f_l'(a_l)

One launch covers every point that shares an activation and (for rademacher) word alignment,
which is one or two launches for a real model (plain points + one activation). Per-point data
(output and pre-activation pointers, column offset, width, scale) sit in small device tables;
each program finds its point from the prefix sum of the points' tile counts, computed in the
kernel so the autotuner's tile sizes need no host-side table.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .grouped_gemm import group_of
from .hash import as_int32, seed_key_host
from .project import (_FLOAT_DTYPES, _GPU_CONFIGS, _INTERPRET_META, INTERPRET, _check_distribution, _check_float_tensor,
                      _check_int, _fp32_dot_precision, _sparse_threshold, accumulate_tile)

# Activation codes, equal to the C++ enum dfa_kernels::Activation (activation.h).
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4, "silu": 5}
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def activation_grad(a, ACT: tl.constexpr):
    """f'(a) in fp32, the formulas of activation.h."""
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


@triton.jit(do_not_specialize=["skey", "threshold"])
def _points_kernel(e_ptr, b_ptr, out_tab, act_tab, off_tab, width_tab, scale_tab, P, N, K,
                   stride_em, stride_ek, stride_bk, stride_bn, skey, threshold, n_bucket,
                   VIRTUAL: tl.constexpr, DIST: tl.constexpr, ACT: tl.constexpr, ALIGNED: tl.constexpr,
                   OUT_TYPE: tl.constexpr, ACT_TYPE: tl.constexpr, MAX_P: tl.constexpr,
                   LIBDEVICE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Which point: tiles are numbered point by point, row-major inside a point.
    pid = tl.program_id(0)
    idx = tl.arange(0, MAX_P)
    widths = tl.load(width_tab + idx, mask=idx < P, other=0)
    point, first = group_of(pid, tl.cdiv(N, BM) * tl.cdiv(widths, BN), MAX_P)
    W = tl.load(width_tab + point)
    col0 = tl.load(off_tab + point)
    scale = tl.load(scale_tab + point)
    out_ptr = tl.load(out_tab + point).to(tl.pointer_type(OUT_TYPE))

    local = pid - first
    num_n = tl.cdiv(W, BN)
    pid_m = local // num_n
    pid_n = local % num_n
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < N
    n_mask = offs_n < W
    acc = accumulate_tile(e_ptr, b_ptr, N, K, col0, pid_n, offs_m, offs_n, n_mask, stride_em, stride_ek, stride_bk,
                          stride_bn, skey, threshold, VIRTUAL, DIST, ALIGNED, LIBDEVICE, INPUT_PRECISION, BM, BN, BK)
    acc = acc * scale
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m[:, None].to(tl.int64) * W + offs_n[None, :]  # outputs and pre-activations are [N, W]
    if ACT != 0:
        act_ptr = tl.load(act_tab + point).to(tl.pointer_type(ACT_TYPE))
        pre = tl.load(act_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        acc = acc * activation_grad(pre, ACT)
    tl.store(out_ptr + rows, acc.to(OUT_TYPE), mask=mask)


def _prune(configs, named_args, **kwargs):
    N, K = named_args["N"], named_args["K"]
    return [c for c in configs
            if c.kwargs["BM"] <= max(32, triton.next_power_of_2(N)) and c.kwargs["BK"] <= max(32, triton.next_power_of_2(K))]


if INTERPRET:
    _points_launch = _points_kernel
else:
    _points_launch = triton.autotune(
        configs=_GPU_CONFIGS,
        key=["n_bucket", "K", "VIRTUAL", "DIST", "ACT", "ALIGNED", "MAX_P", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune},
    )(_points_kernel)


def _check_points(e, offsets, widths, scales, act_inputs, activations):
    count = len(offsets)
    if not len(widths) == len(scales) == len(act_inputs) == len(activations) == count:
        raise ValueError(f"offsets, widths, scales, act_inputs and activations need one entry per point; got "
                         f"{count}, {len(widths)}, {len(scales)}, {len(act_inputs)} and {len(activations)}")
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
            raise ValueError(f"act_inputs[{l}] (the pre-activation [N, {widths[l]}]) is required for "
                             f"activation {activations[l]!r}")
        _check_float_tensor(f"act_inputs[{l}]", a, 2)
        if tuple(a.shape) != (e.shape[0], widths[l]) or a.device != e.device:
            raise ValueError(f"act_inputs[{l}] must have shape [N, widths[{l}]] = [{e.shape[0]}, {widths[l]}] on "
                             f"{e.device}, got {tuple(a.shape)} on {a.device}")


def project_points(e: torch.Tensor, B: torch.Tensor | None, seed: int, distribution: str, density: float,
                   offsets, widths, scales, act_inputs, activations, out_dtype=None) -> list[torch.Tensor]:
    """Every point's (scaled, activation-weighted) slice of e @ B; same arguments as the op."""
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
            raise ValueError(f"B must be [e.shape[1] = {e.shape[1]}, *] on {e.device}, got {tuple(B.shape)} on {B.device}")
        if any(o + w > B.shape[1] for o, w in zip(offsets, widths)):
            raise ValueError(f"B has {B.shape[1]} columns, fewer than the points read")
    out_dtype = e.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    N, K = e.shape
    outs = [(torch.zeros if K == 0 else torch.empty)((N, w), dtype=out_dtype, device=e.device) for w in widths]
    if N == 0 or K == 0:
        return outs

    # One launch per (activation, pre-activation dtype, rademacher alignment) present.
    groups: dict = {}
    for l, (off, w) in enumerate(zip(offsets, widths)):
        if w == 0:
            continue
        a = act_inputs[l]
        aligned = B is None and dist == 2 and off % 32 == 0
        key = (ACTIVATION_CODES[activations[l]], None if a is None else a.dtype, aligned)
        groups.setdefault(key, []).append(l)
    skey = as_int32(seed_key_host(seed))
    for (act, act_dtype, aligned), points in groups.items():
        device = e.device
        pre = [act_inputs[l].contiguous() if act else None for l in points]
        out_tab = torch.tensor([outs[l].data_ptr() for l in points], dtype=torch.int64, device=device)
        act_tab = torch.tensor([p.data_ptr() if p is not None else 0 for p in pre], dtype=torch.int64, device=device)
        off_tab = torch.tensor([offsets[l] for l in points], dtype=torch.int64, device=device)
        width_tab = torch.tensor([widths[l] for l in points], dtype=torch.int32, device=device)
        scale_tab = torch.tensor([scales[l] for l in points], dtype=torch.float32, device=device)
        args = (e, e if B is None else B, out_tab, act_tab, off_tab, width_tab, scale_tab, len(points), N, K,
                e.stride(0), e.stride(1), 0 if B is None else B.stride(0), 0 if B is None else B.stride(1),
                skey, threshold, triton.next_power_of_2(N))
        consts = dict(VIRTUAL=B is None, DIST=dist, ACT=act, ALIGNED=aligned, OUT_TYPE=_TL_DTYPES[out_dtype],
                      ACT_TYPE=_TL_DTYPES[act_dtype or torch.float32],
                      MAX_P=max(2, triton.next_power_of_2(len(points))), LIBDEVICE=not INTERPRET,
                      INPUT_PRECISION=_fp32_dot_precision())

        def grid(meta, ws=[widths[l] for l in points]):
            return (sum(math.ceil(N / meta["BM"]) * math.ceil(w / meta["BN"]) for w in ws),)

        if INTERPRET:
            _points_launch[grid(_INTERPRET_META)](*args, **consts, **_INTERPRET_META)
        else:
            _points_launch[grid](*args, **consts)
    return outs
