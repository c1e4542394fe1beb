"""Triton grouped weight gradient: out[l] = grads[l]^T @ inputs[l] for every layer, one launch.

The layers of a DFA network are independent in the backward pass, so their weight-gradient GEMMs
go into one grid: per-layer pointers, shapes and strides sit in small device tables, and each
program finds its layer from the prefix sum of the layers' tile counts (computed in the kernel,
so the autotuner's tile sizes need no host-side table). The reduction runs over the rows N_l.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .project import _FLOAT_DTYPES, _INTERPRET_META, INTERPRET, _check_float_tensor, _fp32_dot_precision

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_GPU_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3),
                             (32, 32, 64, 4, 4)]
]


@triton.jit
def group_of(pid, tiles, MAX_G: tl.constexpr):
    """(group, its first tile) of program `pid`, tiles [MAX_G] holding each group's tile count
    (0 past the last group): tiles are numbered group by group."""
    ends = tl.cumsum(tiles, axis=0)
    group = tl.sum((ends <= pid).to(tl.int32), axis=0)
    first = tl.sum(tl.where(tl.arange(0, MAX_G) < group, tiles, 0), axis=0)
    return group, first


@triton.jit
def _grouped_kernel(g_tab, x_tab, out_tab, n_tab, o_tab, i_tab, G,
                    IN_TYPE: tl.constexpr, OUT_TYPE: tl.constexpr, MAX_G: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    idx = tl.arange(0, MAX_G)
    outs = tl.load(o_tab + idx, mask=idx < G, other=0)
    ins = tl.load(i_tab + idx, mask=idx < G, other=0)
    layer, first = group_of(pid, tl.cdiv(outs, BM) * tl.cdiv(ins, BN), MAX_G)
    N = tl.load(n_tab + layer)
    O = tl.load(o_tab + layer)
    I = tl.load(i_tab + layer)
    g_ptr = tl.load(g_tab + layer).to(tl.pointer_type(IN_TYPE))   # grads[l]: [N, O] contiguous
    x_ptr = tl.load(x_tab + layer).to(tl.pointer_type(IN_TYPE))   # inputs[l]: [N, I] contiguous
    out_ptr = tl.load(out_tab + layer).to(tl.pointer_type(OUT_TYPE))

    local = pid - first
    num_n = tl.cdiv(I, BN)
    offs_m = (local // num_n) * BM + tl.arange(0, BM)   # rows of out: output features
    offs_n = (local % num_n) * BN + tl.arange(0, BN)    # columns of out: input features
    offs_k = tl.arange(0, BK)                           # the reduction: rows of the batch
    m_mask, n_mask = offs_m < O, offs_n < I
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, N, BK):
        k = k0 + offs_k
        k_mask = k < N
        gt = tl.load(g_ptr + k[None, :].to(tl.int64) * O + offs_m[:, None], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)                                                   # [BM, BK] = g^T tile
        x = tl.load(x_ptr + k[:, None].to(tl.int64) * I + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)                                                    # [BK, BN]
        acc = tl.dot(gt, x, acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * I + offs_n[None, :], acc.to(OUT_TYPE),
             mask=m_mask[:, None] & n_mask[None, :])


if INTERPRET:
    _grouped_launch = _grouped_kernel
else:
    _grouped_launch = triton.autotune(configs=_GPU_CONFIGS, key=["MAX_G", "IN_TYPE", "OUT_TYPE"])(_grouped_kernel)


def grouped_weight_grad(grads, inputs, out_dtype=None) -> list[torch.Tensor]:
    """out[l] = grads[l]^T @ inputs[l] (grads[l] [N_l, out_l], inputs[l] [N_l, in_l]), fp32
    accumulation, out_dtype (default grads[0].dtype); one launch per input dtype present."""
    grads, inputs = list(grads), list(inputs)
    if len(grads) != len(inputs):
        raise ValueError(f"grads and inputs need one tensor per layer; got {len(grads)} and {len(inputs)}")
    for l, (g, x) in enumerate(zip(grads, inputs)):
        _check_float_tensor(f"grads[{l}]", g, 2)
        _check_float_tensor(f"inputs[{l}]", x, 2)
        if g.shape[0] != x.shape[0] or g.dtype != x.dtype or g.device != x.device or g.device != grads[0].device:
            raise ValueError(f"grads[{l}] [N, out] and inputs[{l}] [N, in] need the same N, dtype and device; got "
                             f"{g.dtype} {tuple(g.shape)} on {g.device} and {x.dtype} {tuple(x.shape)} on {x.device}")
    out_dtype = (grads[0].dtype if grads else torch.float32) if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    outs = [torch.zeros((g.shape[1], x.shape[1]), dtype=out_dtype, device=g.device) for g, x in zip(grads, inputs)]
    by_dtype: dict = {}
    for l, (g, x) in enumerate(zip(grads, inputs)):
        if g.shape[0] and g.shape[1] and x.shape[1]:  # empty products stay zero
            by_dtype.setdefault(g.dtype, []).append(l)
    for dtype, layers in by_dtype.items():
        device = grads[layers[0]].device
        gs = [grads[l].contiguous() for l in layers]
        xs = [inputs[l].contiguous() for l in layers]

        def table(values, dt=torch.int64):
            return torch.tensor(values, dtype=dt, device=device)

        args = (table([g.data_ptr() for g in gs]), table([x.data_ptr() for x in xs]),
                table([outs[l].data_ptr() for l in layers]), table([g.shape[0] for g in gs], torch.int32),
                table([g.shape[1] for g in gs], torch.int32), table([x.shape[1] for x in xs], torch.int32), len(layers))
        consts = dict(IN_TYPE=_TL_DTYPES[dtype], OUT_TYPE=_TL_DTYPES[out_dtype],
                      MAX_G=max(2, triton.next_power_of_2(len(layers))), INPUT_PRECISION=_fp32_dot_precision())
        shapes = [(g.shape[1], x.shape[1]) for g, x in zip(gs, xs)]

        def grid(meta):
            return (sum(math.ceil(o / meta["BM"]) * math.ceil(i / meta["BN"]) for o, i in shapes),)

        if INTERPRET:
            _grouped_launch[grid(_INTERPRET_META)](*args, **consts, **_INTERPRET_META)
        else:
            _grouped_launch[grid](*args, **consts)
    return outs
