"""Plain-PyTorch references, shared by tests and benchmarks.

The hash transcribes ``csrc/include/dfa_kernels/hash.h`` on int64 tensors (torch has no wrapping
uint32 multiply), masking to 32 bits after every step. Slow, obviously correct, device-agnostic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch

MASK32 = 0xFFFFFFFF
# the hash's steps run on Python ints (a seed's key) as on int64 tensors (rows, columns)
IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)
DISTRIBUTIONS = ("uniform", "gaussian", "rademacher", "sparse")


def _mul32(x: IntOrTensor, c: int) -> IntOrTensor:
    # (x * c) mod 2^32 without int64 overflow: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: IntOrTensor) -> IntOrTensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The seed's key, a Python int (mix32 and _mul32 work on ints as on tensors)."""
    return mix32((seed & MASK32) ^ 0x9E3779B9)


def row_key(skey: int, i: torch.Tensor) -> torch.Tensor:
    return mix32((skey + _mul32(i, 0x9E3779B9)) & MASK32)


def col_key(j: torch.Tensor) -> torch.Tensor:
    return mix32((_mul32(j, 0x85EBCA6B) + 0x632BE5AB) & MASK32)


def hash_ij(seed: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """hash(seed, i, j) as int64 values in [0, 2^32), broadcasting i against j."""
    return mix32(row_key(seed_key(seed), i) ^ col_key(j))


def sparse_threshold(density: float) -> int:
    return min(max(int(math.floor(density * 16777216.0 + 0.5)), 0), 16777216)


def values_from_hash(h: torch.Tensor, distribution: str, j: torch.Tensor, density: float) -> torch.Tensor:
    """Map hash words to fp32 feedback values (see hash.h for the formulas)."""
    if distribution == "uniform":
        return (h >> 8).to(torch.float32) * 2.0**-23 - 1.0
    if distribution == "rademacher":
        bit = (h >> (j & 31)) & 1
        return bit.to(torch.float32) * 2.0 - 1.0
    if distribution == "sparse":
        keep = (h >> 8) < sparse_threshold(density)
        sign = (h & 1).to(torch.float32) * 2.0 - 1.0
        return torch.where(keep, sign, torch.zeros_like(sign))
    if distribution == "gaussian":
        u1 = ((h >> 8) + 1).to(torch.float32) * 2.0**-24
        u2 = (mix32(h ^ 0x68E31DA4) >> 8).to(torch.float32) * 2.0**-24
        return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def feedback_matrix(
    seed: int,
    distribution: str,
    rows: int,
    cols: int,
    density: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    col_offset: int = 0,
    row_offset: int = 0,
) -> torch.Tensor:
    """B[i, j] for row_offset <= i < row_offset + rows, col_offset <= j < col_offset + cols, dense."""
    device = torch.device(device)
    i = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)[:, None]
    j = torch.arange(col_offset, col_offset + cols, dtype=torch.int64, device=device)[None, :]
    word_j = j >> 5 if distribution == "rademacher" else j
    return values_from_hash(hash_ij(seed, i, word_j), distribution, j, density).to(dtype)


# The virtual product generates B in blocks of at most this many entries (each int64 hash
# temporary of a block is 8 bytes an entry), so its memory is bounded whatever [K, D] is.
BLOCK_ENTRIES = 1 << 20


def virtual_product(
    e32: torch.Tensor, seed: int, distribution: str, density: float, col_offset: int, cols: int
) -> torch.Tensor:
    """e32 @ B[:, col_offset : col_offset + cols] (fp32), B generated block by block, never whole."""
    N, K = e32.shape
    step_k = min(max(K, 1), BLOCK_ENTRIES // 32)
    step_j = max(32, BLOCK_ENTRIES // step_k // 32 * 32)
    parts = []
    for j in range(0, cols, step_j):
        width = min(step_j, cols - j)
        F = e32.new_zeros(N, width)
        for k in range(0, K, step_k):
            rows = min(step_k, K - k)
            B = feedback_matrix(
                seed, distribution, rows, width, density, device=e32.device, col_offset=col_offset + j, row_offset=k
            )
            F = F + e32[:, k : k + rows] @ B
        parts.append(F)
    return torch.cat(parts, 1) if len(parts) != 1 else parts[0]


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
    """F = scale * (e @ B) [* col_scale], accumulated in fp32, returned in out_dtype (default e's).

    Same argument order as the ``dfa_kernels::project`` op. B is generated in bounded blocks.
    """
    F = virtual_product(e.to(torch.float32), seed, distribution, density, 0, width) * scale
    if col_scale is not None:
        F = F * col_scale.to(torch.float32)
    return F.to(out_dtype or e.dtype)


def project_materialized(
    e: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    col_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    F = (e.to(torch.float32) @ B.to(torch.float32)) * scale
    if col_scale is not None:
        F = F * col_scale.to(torch.float32)
    return F.to(out_dtype or e.dtype)


ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid", "silu")


def activation(a: torch.Tensor, name: str) -> torch.Tensor:
    """f(a) for the activations the fused epilogue knows (gelu: the exact, erf form)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")
    fns = {
        "none": lambda x: x,
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "silu": torch.nn.functional.silu,
    }
    return fns[name](a)


def activation_grad(a: torch.Tensor, name: str) -> torch.Tensor:
    """f'(a) in fp32, the formulas of csrc/include/dfa_kernels/activation.h."""
    a = a.to(torch.float32)
    if name == "none":
        return torch.ones_like(a)
    if name == "relu":
        return (a > 0).to(torch.float32)
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * torch.exp(-0.5 * a * a)
    if name == "tanh":
        return 1.0 - torch.tanh(a) ** 2
    if name == "sigmoid":
        s = torch.sigmoid(a)
        return s * (1.0 - s)
    if name == "silu":
        s = torch.sigmoid(a)
        return s * (1.0 + a * (1.0 - s))
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")


def column_spans(offsets: Sequence[int], widths: Sequence[int]) -> list[tuple[int, int]]:
    """The union of the points' column ranges [offset, offset + width) as sorted, disjoint
    (start, stop) spans: overlapping or touching ranges merge. The independent layout is one span
    [0, D); the shared layout (every point reads the first d_l columns) one span [0, max d_l)."""
    spans: list[list[int]] = []
    for off, w in sorted((int(o), int(w)) for o, w in zip(offsets, widths) if w > 0):
        if spans and off <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], off + w)
        else:
            spans.append([off, off + w])
    return [(a, b) for a, b in spans]


def project_points(
    e: torch.Tensor,
    B: torch.Tensor | None,
    seed: int,
    distribution: str,
    density: float,
    offsets: Sequence[int],
    widths: Sequence[int],
    scales: Sequence[float],
    act_inputs: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """out[l] = (scales[l] * (e @ B[:, offsets[l]:offsets[l] + widths[l]])) * f_l'(act_inputs[l]).

    Same argument order as the ``dfa_kernels::project_points`` op; B None generates it. The product
    is computed once per column span (see column_spans), so points that share columns (the shared
    layout) share it; each point's epilogue reads its slice.
    """
    e32 = e.to(torch.float32)
    products = []  # (start, stop, e @ B[:, start:stop])
    for start, stop in column_spans(offsets, widths):
        F = (
            e32 @ B[:, start:stop].to(torch.float32)
            if B is not None
            else virtual_product(e32, seed, distribution, density, start, stop - start)
        )
        products.append((start, stop, F))
    outs = []
    for off, w, s, a, act in zip(offsets, widths, scales, act_inputs, activations):
        if w == 0:
            outs.append(e.new_zeros(e.shape[0], 0, dtype=out_dtype or e.dtype))
            continue
        start, F_span = next((a0, F) for a0, b0, F in products if a0 <= off and off + w <= b0)
        F = F_span[:, off - start : off - start + w] * s
        if act != "none":
            assert a is not None  # a fused point passes its pre-activation
            F = F * activation_grad(a, act)
        outs.append(F.to(out_dtype or e.dtype))
    return outs


def grouped_weight_grad(
    grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], out_dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """out[l] = grads[l]^T @ inputs[l], accumulated in fp32 (the ``dfa_kernels::grouped_weight_grad`` op)."""
    default = grads[0].dtype if len(grads) else torch.float32
    return [(g.to(torch.float32).T @ x.to(torch.float32)).to(out_dtype or default) for g, x in zip(grads, inputs)]
