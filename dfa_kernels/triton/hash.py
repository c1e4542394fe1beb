"""Triton transcription of ``csrc/include/dfa_kernels/hash.h``: B[i, j] = dist(hash(seed, i, j)).

Every hash operand is a ``tl.uint32`` tensor, so multiplies wrap modulo 2^32 and ``>>`` is a
logical shift, exactly as in the C++ header. Integer literals combine with a uint32 tensor as
uint32 (same width, unsigned wins), so the constants need no explicit cast.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Distribution codes, equal to the C++ enum dfa_kernels::Distribution.
UNIFORM = tl.constexpr(0)
GAUSSIAN = tl.constexpr(1)
RADEMACHER = tl.constexpr(2)
SPARSE = tl.constexpr(3)
DISTRIBUTION_CODES = {"uniform": 0, "gaussian": 1, "rademacher": 2, "sparse": 3}

MASK32 = 0xFFFFFFFF


def mix32_host(x: int) -> int:
    """lowbias32 on a Python int, for keys computed once on the host (the seed key)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def seed_key_host(seed: int) -> int:
    return mix32_host(seed ^ 0x9E3779B9)


def as_int32(x: int) -> int:
    """Reinterpret a uint32 as int32, so kernel scalars always get the same (i32) signature;
    the kernel casts them back to uint32, which keeps the bits."""
    x &= MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


@triton.jit
def mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def row_key(skey, i):
    return mix32(skey + i * 0x9E3779B9)


@triton.jit
def col_key(j):
    return mix32(j * 0x85EBCA6B + 0x632BE5AB)


@triton.jit
def uniform_value(h):
    return (h >> 8).to(tl.float32) * 1.1920928955078125e-07 - 1.0  # 2^-23


@triton.jit
def gaussian_value(h, LIBDEVICE: tl.constexpr):
    u1 = ((h >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, in (0, 1]
    u2 = (mix32(h ^ 0x68E31DA4) >> 8).to(tl.float32) * 5.9604644775390625e-08
    # libdevice pins the accurate logf/cosf/sqrtf on GPUs (ln u1 near 1 needs full relative
    # accuracy); the interpreter has no libdevice and uses numpy's through tl.log/tl.cos.
    if LIBDEVICE:
        z = libdevice.sqrt(-2.0 * libdevice.log(u1)) * libdevice.cos(6.283185307179586 * u2)
    else:
        z = tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)
    return z


@triton.jit
def sparse_value(h, threshold):
    sign = (h & 1).to(tl.float32) * 2.0 - 1.0
    return tl.where((h >> 8) < threshold, sign, 0.0)


@triton.jit
def rademacher_value(word, j):
    return ((word >> (j & 31)) & 1).to(tl.float32) * 2.0 - 1.0


@triton.jit
def value_from_keys(rkey, ckey, j, threshold, DIST: tl.constexpr, LIBDEVICE: tl.constexpr):
    """B[i, j] as fp32 from broadcastable row/column keys; for rademacher, ``ckey`` must be
    col_key(j >> 5) (see col_key_for)."""
    h = mix32(rkey ^ ckey)
    if DIST == UNIFORM:
        v = uniform_value(h)
    elif DIST == GAUSSIAN:
        v = gaussian_value(h, LIBDEVICE)
    elif DIST == RADEMACHER:
        v = rademacher_value(h, j)
    else:
        v = sparse_value(h, threshold)
    return v


@triton.jit
def col_key_for(j, DIST: tl.constexpr):
    if DIST == RADEMACHER:
        k = col_key(j >> 5)
    else:
        k = col_key(j)
    return k


@triton.jit
def rademacher_tile(rkey, wkey, BK: tl.constexpr, BN: tl.constexpr):
    """[BK, BN] rademacher tile whose first column is a multiple of 32: one hash word per row and
    32 columns (``wkey`` = col_key of the BN // 32 word indices), expanded bit by bit."""
    words = mix32(rkey[:, None] ^ wkey[None, :])  # [BK, BN // 32]
    bit = tl.arange(0, 32).to(tl.uint32)
    signs = ((words[:, :, None] >> bit[None, None, :]) & 1).to(tl.float32) * 2.0 - 1.0
    return tl.reshape(signs, (BK, BN))  # row-major: column = word * 32 + bit
