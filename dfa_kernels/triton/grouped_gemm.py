"""Triton grouped weight gradient: out[l] = grads[l]^T @ inputs[l] for every layer, one launch.

The layers of a DFA network are independent in the backward pass, so their weight-gradient GEMMs
go into one grid: per-layer pointers and shapes sit in small device tables (written by a kernel
launch, never copied from the host: tables.py), and each program finds its layer from the prefix
sum of the layers' tile counts (computed in the kernel, so the autotuner's tile sizes need no
host-side table). The reduction runs over the rows N_l; when the output tiles alone cannot fill
the GPU (small layers, many rows), the rows are split over the grid's second axis into an fp32
workspace that one sum reduces (a fixed order: deterministic).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .project import _FLOAT_DTYPES, _INTERPRET_META, _check_float_tensor, _fp32_dot_precision
from .tables import cached_table, device_table
from .tuning import INTERPRET, autotuned, device_guard, device_index, fit_tiles

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_GPU_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 8, 3),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (32, 32, 64, 4, 4),
    ]
]
MAX_SPLITS = 16
MIN_ROWS_PER_SPLIT = 1024


@triton.jit
def group_of(pid, tiles, MAX_G: tl.constexpr):
    """(group, its first tile) of program `pid`, tiles [MAX_G] holding each group's tile count
    (0 past the last group): tiles are numbered group by group."""
    ends = tl.cumsum(tiles, axis=0)
    group = tl.sum((ends <= pid).to(tl.int32), axis=0)
    first = tl.sum(tl.where(tl.arange(0, MAX_G) < group, tiles, 0), axis=0)
    return group, first


# Not specialized: G (table offsets only), rows_per_split (follows the batch; it bounds the
# reduction, which runs along no contiguous axis) and the autotuning keys. ws_stride stays
# specialized: it aligns each split's workspace slice for vector stores.
@triton.jit(do_not_specialize=["G", "rows_per_split", "n_bucket", "o_bucket", "i_bucket"])
def _grouped_kernel(
    ptr_tab,
    shape_tab,
    G,
    rows_per_split,
    ws_ptr,
    ws_stride,
    n_bucket,
    o_bucket,
    i_bucket,
    IN_TYPE: tl.constexpr,
    OUT_TYPE: tl.constexpr,
    MAX_G: tl.constexpr,
    SPLIT: tl.constexpr,
    HINTS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    # ptr_tab [3G]: grads, inputs, outputs; shape_tab [4G]: N, out, in, the layer's offset in a
    # workspace slice. *_bucket are only autotuning keys.
    pid = tl.program_id(0)
    idx = tl.arange(0, MAX_G)
    outs = tl.load(shape_tab + G + idx, mask=idx < G, other=0)
    ins = tl.load(shape_tab + 2 * G + idx, mask=idx < G, other=0)
    layer, first = group_of(pid, tl.cdiv(outs, BM) * tl.cdiv(ins, BN), MAX_G)
    N = tl.load(shape_tab + layer)
    O = tl.load(shape_tab + G + layer)
    I = tl.load(shape_tab + 2 * G + layer)
    g_ptr = tl.load(ptr_tab + layer).to(tl.pointer_type(IN_TYPE))  # grads[l]: [N, O] contiguous
    x_ptr = tl.load(ptr_tab + G + layer).to(tl.pointer_type(IN_TYPE))  # inputs[l]: [N, I] contiguous
    if HINTS:  # pointers loaded from a table carry no alignment: every one is 16-byte aligned, O and I
        g_ptr = tl.multiple_of(g_ptr, 16)  # multiples of 16 (vector loads and stores)
        x_ptr = tl.multiple_of(x_ptr, 16)
        O = tl.multiple_of(O, 16)
        I = tl.multiple_of(I, 16)

    local = pid - first
    num_n = tl.cdiv(I, BN)
    offs_m = (local // num_n) * BM + tl.arange(0, BM)  # rows of out: output features
    offs_n = (local % num_n) * BN + tl.arange(0, BN)  # columns of out: input features
    offs_k = tl.arange(0, BK)  # the reduction: rows of the batch
    m_mask, n_mask = offs_m < O, offs_n < I
    k_begin = tl.program_id(1) * rows_per_split
    k_end = tl.minimum(N, k_begin + rows_per_split)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BK):
        k = k0 + offs_k
        k_mask = k < k_end
        gt = tl.load(
            g_ptr + k[None, :].to(tl.int64) * O + offs_m[:, None], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )  # [BM, BK] = g^T tile
        x = tl.load(
            x_ptr + k[:, None].to(tl.int64) * I + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0
        )  # [BK, BN]
        acc = tl.dot(gt, x, acc, input_precision=INPUT_PRECISION)
    tile = offs_m[:, None].to(tl.int64) * I + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:  # raw fp32 sums into this split's slice of the workspace
        ws = ws_ptr + tl.program_id(1).to(tl.int64) * ws_stride + tl.load(shape_tab + 3 * G + layer)
        tl.store(ws + tile, acc, mask=mask)
    else:
        out_ptr = tl.load(ptr_tab + 2 * G + layer).to(tl.pointer_type(OUT_TYPE))
        if HINTS:
            out_ptr = tl.multiple_of(out_ptr, 16)
        tl.store(out_ptr + tile, acc.to(OUT_TYPE), mask=mask)


def prune_grouped(configs, named_args, **kwargs):
    """No tile past the largest layer (out and in features) or the rows of a split."""
    return fit_tiles(configs, BM=named_args["o_bucket"], BN=named_args["i_bucket"], BK=named_args["rows_per_split"])


_KEY = ["n_bucket", "o_bucket", "i_bucket", "MAX_G", "IN_TYPE", "OUT_TYPE", "SPLIT"]
_grouped_launch = autotuned("grouped", _grouped_kernel, _GPU_CONFIGS, _KEY, _INTERPRET_META, prune_grouped)


@functools.cache
def _sm_count(index: int) -> int:
    """Per CUDA device index: GPUs of one process may differ."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(shapes, N: int, device) -> int:
    """Row splits: enough programs for two per SM (counted with 128 x 128 tiles), each split at
    least MIN_ROWS_PER_SPLIT rows; 1 under the interpreter."""
    if INTERPRET:
        return 1
    tiles = sum(math.ceil(o / 128) * math.ceil(i / 128) for o, i in shapes)
    want = math.ceil(2 * _sm_count(device_index(device)) / max(tiles, 1))
    return max(1, min(MAX_SPLITS, want, N // MIN_ROWS_PER_SPLIT))


def grouped_weight_grad(grads, inputs, out_dtype=None, splits: int | None = None) -> list[torch.Tensor]:
    """out[l] = grads[l]^T @ inputs[l] (grads[l] [N_l, out_l], inputs[l] [N_l, in_l]), fp32
    accumulation, out_dtype (default grads[0].dtype); one launch per input dtype present.
    `splits` (tests): the row splits, instead of the automatic choice."""
    grads, inputs = list(grads), list(inputs)
    if len(grads) != len(inputs):
        raise ValueError(f"grads and inputs need one tensor per layer; got {len(grads)} and {len(inputs)}")
    for l, (g, x) in enumerate(zip(grads, inputs)):
        _check_float_tensor(f"grads[{l}]", g, 2)
        _check_float_tensor(f"inputs[{l}]", x, 2)
        if g.shape[0] != x.shape[0] or g.dtype != x.dtype or g.device != x.device or g.device != grads[0].device:
            raise ValueError(
                f"grads[{l}] [N, out] and inputs[{l}] [N, in] need the same N, dtype and device; got "
                f"{g.dtype} {tuple(g.shape)} on {g.device} and {x.dtype} {tuple(x.shape)} on {x.device}"
            )
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
        shapes = [(g.shape[1], x.shape[1]) for g, x in zip(gs, xs)]
        N = max(g.shape[0] for g in gs)
        split = _splits(shapes, N, device) if splits is None else splits
        sizes = [o * i for o, i in shapes]
        ws_offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        ws = torch.empty((split, sum(sizes)), dtype=torch.float32, device=device) if split > 1 else None
        G = len(layers)
        shape_tab = cached_table(
            [g.shape[0] for g in gs] + [o for o, _ in shapes] + [i for _, i in shapes] + ws_offsets, torch.int64, device
        )
        pointers = [g.data_ptr() for g in gs] + [x.data_ptr() for x in xs] + [outs[l].data_ptr() for l in layers]
        ptr_tab = device_table(pointers, torch.int64, device)
        hints = all(p % 16 == 0 for p in pointers) and all(o % 16 == 0 and i % 16 == 0 for o, i in shapes)
        args = (
            ptr_tab,
            shape_tab,
            G,
            math.ceil(N / split),
            ws if ws is not None else ptr_tab,
            ws.stride(0) if ws is not None else 0,
            triton.next_power_of_2(N),
            triton.next_power_of_2(max(o for o, _ in shapes)),
            triton.next_power_of_2(max(i for _, i in shapes)),
        )
        consts = dict(
            IN_TYPE=_TL_DTYPES[dtype],
            OUT_TYPE=_TL_DTYPES[out_dtype],
            MAX_G=max(2, triton.next_power_of_2(G)),
            SPLIT=split > 1,
            HINTS=hints,
            INPUT_PRECISION=_fp32_dot_precision(),
        )

        def grid(meta, shapes=shapes, split=split):
            return (sum(math.ceil(o / meta["BM"]) * math.ceil(i / meta["BN"]) for o, i in shapes), split)

        with device_guard(device):
            _grouped_launch[grid](*args, **consts)
        if ws is not None:  # sum the splits (fixed order), then each layer's block into its output
            total = ws.sum(0)
            for l, off, (o, i) in zip(layers, ws_offsets, shapes):
                outs[l].copy_(total[off : off + o * i].view(o, i))
    return outs
