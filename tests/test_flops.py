"""FLOP formulas of the ops (torch.utils.flop_counter) and the step FLOP counts of bench_step."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dfa_kernels as dk
from dfa_kernels.bench import step

BACKENDS = dk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["virtual", "materialized"])
def test_flop_counter_counts_our_ops(backend, storage):
    N, K, widths = 5, 3, [4, 6]
    spec = dk.FeedbackSpec(K, widths, seed=1)
    e = torch.randn(N, K)
    a = torch.randn(N, 4)
    with FlopCounterMode(display=False) as counter:
        dk.project(e, spec, storage, backend)
        dk.ops.project_points(e, spec, storage, backend, act_inputs=[a, None], activations=["relu", "none"])
        dk.ops.grouped_weight_grad(
            [torch.randn(N, 4), torch.randn(N, 2)], [torch.randn(N, 7), torch.randn(N, 9)], backend
        )
    gemm = 2 * N * K * sum(widths)
    assert counter.get_total_flops() == 2 * gemm + 2 * N * (4 * 7 + 2 * 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_project_points_counts_the_union_of_columns(backend):
    """Points that share columns share one product: 2 N K (size of the union of their columns)."""
    N, K, widths = 5, 3, [4, 6, 2]
    e = torch.randn(N, K)
    for layout, union in (("shared", 6), ("independent", 12)):
        spec = dk.FeedbackSpec(K, widths, seed=1, layout=layout)
        with FlopCounterMode(display=False) as counter:
            dk.ops.project_points(e, spec, "virtual", backend)
        assert counter.get_total_flops() == 2 * N * K * union, layout
    with FlopCounterMode(display=False) as counter:  # [0, 10) and [20, 23) with a gap: 13 columns
        dk.ops.project_points(e, dk.FeedbackSpec(K, [10, 3]), "virtual", backend)
        torch.ops.dfa_kernels.project_points(
            e, None, 1, "uniform", 0.1, [0, 5, 20], [10, 3, 3], [1.0] * 3, [None] * 3, ["none"] * 3, None
        )
    assert counter.get_total_flops() == 2 * N * K * 13 + 2 * N * K * 13


def test_step_flops_by_hand():
    """MLP "tiny" (2 hidden layers of 32, batch 16, 4 classes): BP runs every weight and input
    gradient but the first layer's input gradient; DFA runs the weight gradients and the projection
    of the 4-wide error to the 64 hidden columns, and no input gradient at all."""
    flops = step.count_flops("mlp", "tiny", "cpu", ["bp", "dfa", "dfa_fused", "tinydfa_style"])
    assert flops["counted_on"] == "fake tensors"
    hidden, head, projection = 2 * 16 * 32 * 32, 2 * 16 * 32 * 4, 2 * 16 * 4 * 64
    forward = 2 * hidden + head
    expected = {
        "bp": forward + (2 * head) + (2 * hidden) + hidden,
        "dfa": forward + head + 2 * hidden + projection,
        "dfa_fused": forward + head + 2 * hidden + projection,
        # TinyDFA's points are leaves that require grad: BP's input gradients, plus e @ B
        "tinydfa_style": forward + 2 * head + 3 * hidden + projection,
    }
    assert {v: round(g * 1e9) for v, g in flops["gflop_per_step"].items()} == expected
    assert flops["flop_ratio_over_bp"]["dfa"] == pytest.approx(expected["dfa"] / expected["bp"])


def test_gcn_flops_fall_back_to_a_real_step():
    """PyG's graph normalisation has data-dependent shapes: counted from one real step, and said so."""
    pytest.importorskip("torch_geometric")
    flops = step.count_flops("gcn", "tiny", "cpu", ["bp", "dfa"])
    assert flops["counted_on"] == "one real step on cpu"
    assert flops["gflop_per_step"]["bp"] > 0
