"""FLOP formulas of the ops, so ``torch.utils.flop_counter.FlopCounterMode`` counts them.

A step's FLOPs are hardware-independent: the ratio of a DFA step's FLOPs to the BP step's is the
time ratio a compute-bound device can reach at best (bench_step reports both).
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .reference import column_spans


def _project(e_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(e_shape) * out_shape[1]  # e [N, K] @ B [K, W]


def _project_points(e_shape, B, seed, distribution, density, offsets, widths, *args, **kwargs) -> int:
    # One product per column span: points that share columns (the shared layout) share it.
    return 2 * math.prod(e_shape) * sum(stop - start for start, stop in column_spans(offsets, widths))


def _grouped_weight_grad(grads, inputs, *args, **kwargs) -> int:
    return sum(2 * g[0] * g[1] * x[1] for g, x in zip(grads, inputs))  # grads[l]^T @ inputs[l]


def register() -> None:
    """Registers the formulas for the compiled ops and their Triton mirrors (those present)."""
    formulas = {
        "project": _project,
        "project_materialized": _project,
        "project_points": _project_points,
        "grouped_weight_grad": _grouped_weight_grad,
    }
    for name, formula in formulas.items():
        for op_name in (name, f"triton_{name}"):
            if hasattr(torch.ops.dfa_kernels, op_name):
                register_flop_formula(getattr(torch.ops.dfa_kernels, op_name))(formula)
