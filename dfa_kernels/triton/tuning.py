"""What every Triton launch of the package shares: the interpreter mode, autotuning (the
DFA_TRITON_AUTOTUNE switch, tile pruning) and the CUDA device a launch runs on.

DFA_TRITON_AUTOTUNE, read once when ``dfa_kernels.triton`` is first imported: "1" (the default)
lets each autotuned kernel benchmark its configs for every new shape key; "0" launches each with
its first config (``TUNED[name].configs[0]``), without benchmarking: one compile per variant
instead of one per config, for tests and first runs on a new GPU. Any other value is an error.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch
import triton

# triton.jit picks the interpreter at decoration time, so this is the mode of every kernel here.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_SWITCH = os.environ.get("DFA_TRITON_AUTOTUNE", "1")
if _SWITCH not in ("0", "1"):
    raise ValueError(f"DFA_TRITON_AUTOTUNE must be 0 or 1, got {_SWITCH!r}")
AUTOTUNE = _SWITCH == "1"


class Tuned(NamedTuple):
    kernel: object  # the triton.jit function
    configs: list  # every config it may be launched with on a GPU; configs[0] is the fixed one
    launch: object  # the triton.autotune wrapper the package launches


# name -> Tuned for every autotuned kernel: the compile check compiles each config, tests read it.
TUNED: dict[str, Tuned] = {}


def autotuned(name: str, kernel, configs: list, key: list, interpret_meta: dict, prune=None):
    """`kernel` under triton.autotune over `configs` (configs[0] alone with DFA_TRITON_AUTOTUNE=0);
    under the interpreter over the one config `interpret_meta`, as benchmarking would rerun every
    candidate on the CPU. Triton launches a lone config without benchmarking or pruning."""
    if INTERPRET:
        used = [triton.Config(interpret_meta)]
    else:
        used = configs if AUTOTUNE else configs[:1]
    launch = triton.autotune(configs=used, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)(
        kernel
    )
    TUNED[name] = Tuned(kernel, configs, launch)
    return launch


def fit_tiles(configs: list, floor: int = 32, **sizes: int) -> list:
    """The configs whose every block (a meta-parameter named in `sizes`, with the problem's size
    along it) is at most that size rounded up to a power of two, or `floor`: a larger tile only
    adds masked work and tuning time. When none fits, the one that pads the problem least (the
    first listed among equals), so at least one config always remains."""

    def fits(c):
        return all(c.kwargs[b] <= max(floor, triton.next_power_of_2(s)) for b, s in sizes.items())

    def padded(c):
        return math.prod(triton.cdiv(max(s, 1), c.kwargs[b]) * c.kwargs[b] for b, s in sizes.items())

    return [c for c in configs if fits(c)] or [min(configs, key=padded)]


def device_index(device) -> int | None:
    """The CUDA device index of `device` (a bare "cuda" is the current device); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def device_guard(device: torch.device):
    """Triton launches (and benchmarks) on the current CUDA device and its stream: make that
    `device` for the launches of a call. CPU tensors (the interpreter) need nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
