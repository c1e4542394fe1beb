"""Triton cross-entropy over a chunk of logits, in place: row r of logits [C, V] becomes
(softmax(row) - onehot(target_r)) * inv_count, and the row's loss is returned; rows whose target is
ignore_index become zeros with loss 0. Two passes over the row: an online max / sum-of-exp, then
the gradient; V needs no padding to a power of two."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .project import _check_device
from .tuning import INTERPRET, device_guard


# ignore_index only meets a compare: not specialized. V (masks along the row) and stride stay.
@triton.jit(do_not_specialize=["ignore_index"])
def _ce_kernel(logits_ptr, target_ptr, loss_ptr, inv_count_ptr, V, stride, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=-float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    picked = tl.load(base + tl.where(valid, target, 0))
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    scale = tl.where(valid, tl.load(inv_count_ptr), 0.0)
    for v0 in range(0, V, BLOCK):
        idx = v0 + cols
        x = tl.load(base + idx, mask=idx < V, other=0.0)
        g = (tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)) * scale
        tl.store(base + idx, g, mask=idx < V)


def cross_entropy_grad_(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, inv_count: torch.Tensor
) -> torch.Tensor:
    """Per-row losses [C]; `logits` (fp32 [C, V], unit column stride) is overwritten by the gradient.
    inv_count: 1 / (rows counted), a one-element fp32 tensor on logits' device (read by the kernel:
    no host sync)."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be a float32 [C, V] tensor with unit column stride; got {logits.dtype} "
            f"{tuple(logits.shape)} strides {logits.stride()}"
        )
    if target.shape != logits.shape[:1] or target.dtype != torch.int64:
        raise ValueError(f"target must be int64 [C = {logits.shape[0]}]; got {target.dtype} {tuple(target.shape)}")
    _check_device("logits", logits.device)
    C, V = logits.shape
    losses = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C == 0:
        return losses
    block = 1024 if INTERPRET else min(8192, triton.next_power_of_2(V))
    with device_guard(logits.device):
        _ce_kernel[(C,)](
            logits,
            target.contiguous(),
            losses,
            inv_count.to(torch.float32).reshape(1),
            V,
            logits.stride(0),
            ignore_index,
            BLOCK=block,
            num_warps=1 if INTERPRET else 8,
        )
    return losses
