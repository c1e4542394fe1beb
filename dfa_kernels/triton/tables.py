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

# Values per launch: 256 eight-byte arguments (2 KiB) stay under CUDA's 4 KiB parameter space.
_CHUNK = 256


@triton.jit
def _fill_kernel(dst_ptr, values, COUNT: tl.constexpr):
    for i in tl.static_range(COUNT):
        tl.store(dst_ptr + i, values[i])


def device_table(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D `dtype` tensor on `device` holding `values` (Python ints or floats), without a host copy."""
    values = list(values)
    out = torch.empty(len(values), dtype=dtype, device=device)
    for start in range(0, len(values), _CHUNK):
        chunk = tuple(values[start:start + _CHUNK])
        _fill_kernel[(1,)](out[start:], chunk, COUNT=len(chunk))
    return out


_CACHE: dict = {}
_CACHE_SIZE = 64


def cached_table(values, dtype: torch.dtype, device) -> torch.Tensor:
    """device_table for values that stay the same from step to step (a plan's offsets, widths,
    scales): built on first use and kept (the 64 most recent)."""
    key = (tuple(values), dtype, str(device))
    table = _CACHE.pop(key, None)
    if table is None:
        table = device_table(values, dtype, device)
    _CACHE[key] = table  # most recent last
    while len(_CACHE) > _CACHE_SIZE:
        del _CACHE[next(iter(_CACHE))]
    return table
