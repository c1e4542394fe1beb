"""Small per-launch tables (pointers, shapes, scales) written to the device without a host copy.

The grouped kernels read per-point / per-layer data from device tables. Building them with
``torch.tensor(list, device=cuda)`` copies host memory to the device on every call: a host-device
synchronisation (pageable memory), and an operation a CUDA graph cannot capture. Here the values
travel as the arguments of one tiny kernel launch that stores them into a device buffer, the way
the CUDA kernels pass their point descriptors in the kernel parameters: no copy, no sync, and a
graph replays the launch with the same values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import device_guard, device_index

# Values per launch: 256 eight-byte arguments (2 KiB) stay under CUDA's 4 KiB parameter space.
_CHUNK = 256
# Triton specializes each element of a tuple argument on its value (i32 or i64, divisible by 16,
# equal to 1), and do_not_specialize does not reach into tuples (Triton 3.6 to 3.8): raw values
# would compile a new kernel for each new pattern (a batch size, a width, a null pointer). So an
# integer v travels as 16 v + 2^62, always an i64 divisible by 16, and the values are padded to a
# power of two: one compile per (table dtype, power of two), whatever the values.
_BIAS = tl.constexpr(1 << 62)
_INT_LIMIT = 1 << 57  # |v| < 2^57 keeps 16 v + 2^62 within [2^31, 2^63): an i64


@triton.jit(do_not_specialize=["n"])
def _fill_kernel(dst_ptr, values, n, COUNT: tl.constexpr, ENCODED: tl.constexpr):
    for i in tl.static_range(COUNT):
        if i < n:
            v = values[i]
            if ENCODED:
                v = (v - _BIAS) >> 4
            tl.store(dst_ptr + i, v)


def _encode(values, dtype: torch.dtype) -> tuple[list, object]:
    """The kernel arguments for `values` in a `dtype` table, and the padding value."""
    if dtype.is_floating_point:
        return [float(v) for v in values], 0.0
    values = [int(v) for v in values]
    for v in values:
        if not -_INT_LIMIT < v < _INT_LIMIT:
            raise ValueError(f"device_table holds integers of magnitude below 2^57, got {v}")
    return [16 * v + _BIAS.value for v in values], _BIAS.value


def device_table(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D `dtype` tensor on `device` holding `values` (Python ints or floats), without a host copy."""
    args, pad = _encode(values, dtype)
    out = torch.empty(len(args), dtype=dtype, device=device)
    with device_guard(out.device):
        for start in range(0, len(args), _CHUNK):
            chunk = args[start : start + _CHUNK]
            count = triton.next_power_of_2(len(chunk))
            _fill_kernel[(1,)](
                out[start:],
                tuple(chunk) + (pad,) * (count - len(chunk)),
                len(chunk),
                COUNT=count,
                ENCODED=not dtype.is_floating_point,
            )
    return out


_CACHE: dict = {}
_CACHE_SIZE = 64


def cached_table(values, dtype: torch.dtype, device) -> torch.Tensor:
    """device_table for values that stay the same from step to step (a plan's offsets, widths,
    scales): built on first use and kept (the 64 most recent)."""
    device = torch.device(device)
    key = (tuple(values), dtype, device.type, device_index(device))  # a bare "cuda" is the current device
    table = _CACHE.pop(key, None)
    if table is None:
        table = device_table(values, dtype, device)
    _CACHE[key] = table  # most recent last
    while len(_CACHE) > _CACHE_SIZE:
        del _CACHE[next(iter(_CACHE))]
    return table
