"""The fused DFA forms: dfa.point(a, activation=...) and dfa.linear(x, layer, activation=...).

Each must give the same gradients as the plain form (a point after the activation) in every mode,
and the op behind them (project_points) must match the reference on every backend.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device_pairs
from torch import nn

import dfa_kernels as dk
from dfa_kernels import ops, reference

ACTIVATIONS = ("relu", "gelu", "tanh", "sigmoid", "silu")
CPU_BACKENDS = dk.available_backends("cpu")


class Net(nn.Module):
    """Embedding -> 2 hidden layers -> head; `form` picks how the hidden points are written."""

    def __init__(self, dfa, form, activations=("tanh", "gelu"), bias=True):
        super().__init__()
        self.embed = nn.Embedding(11, 9)
        self.l1, self.l2 = nn.Linear(9, 33, bias=bias), nn.Linear(33, 17, bias=bias)
        self.head = nn.Linear(17, 5)
        self.dfa, self.form, self.acts = dfa, form, activations

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer, act in zip((self.l1, self.l2), self.acts):
            if self.form == "plain":
                x = self.dfa.point(reference.activation(layer(x), act))
            elif self.form == "point":
                x = self.dfa.point(layer(x), activation=act)
            else:
                x = self.dfa.linear(x, layer, activation=act)
        return self.dfa(self.head(x))


def _grads(model, tokens, target):
    model.zero_grad(set_to_none=True)
    y = model(tokens)
    F.cross_entropy(y.reshape(-1, 5), target.reshape(-1)).backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["dfa", "bp", "shallow"])
@pytest.mark.parametrize(
    "layout,storage", [("independent", "virtual"), ("independent", "materialized"), ("shared", "virtual")]
)
def test_fused_forms_match_plain(backend, mode, layout, storage):
    tokens, target = torch.randint(0, 11, (4, 6)), torch.randint(0, 5, (4, 6))  # [B, T] points
    torch.manual_seed(0)
    plain = Net(dk.DFA(mode=mode, seed=3, layout=layout, storage=storage, backend=backend), "plain")
    want = _grads(plain, tokens, target)
    for form in ("point", "linear"):
        model = Net(dk.DFA(mode=mode, seed=3, layout=layout, storage=storage, backend=backend), form)
        model.load_state_dict(plain.state_dict())
        got = _grads(model, tokens, target)
        for name, g in want.items():
            if g is None:
                assert got[name] is None, (form, name)
            else:
                torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=f"{form} {name}")
    if mode == "shallow":
        assert want["l1.weight"] is None and want["embed.weight"] is None
    else:
        assert want["embed.weight"] is not None  # the first layer's input gradient reaches the embedding


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_and_no_bias(activation):
    tokens, target = torch.randint(0, 11, (7,)), torch.randint(0, 5, (7,))
    plain = Net(dk.DFA(seed=1), "plain", (activation, activation), bias=False)
    want = _grads(plain, tokens, target)
    fused = Net(dk.DFA(seed=1), "linear", (activation, activation), bias=False)
    fused.load_state_dict(plain.state_dict())
    got = _grads(fused, tokens, target)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)


def test_linear_point_skips_the_layer_graph_and_mixes_with_plain_points():
    dfa = dk.DFA(seed=0)
    l1, l2, head = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)
    x = torch.randn(5, 4)
    h = dfa.linear(x, l1, "relu")
    assert h.grad_fn is None  # no autograd graph through the layer in mode "dfa"
    h = dfa.point(torch.relu(l2(h)))  # a plain point after a linear one
    y = dfa(head(h))
    y.sum().backward()
    assert l1.weight.grad is not None and l2.weight.grad is not None
    G = ops.project_points(
        torch.ones(5, 3),
        dfa.spec,
        scales=dfa.spec.scales(),
        act_inputs=[l1(x).detach(), None],
        activations=["relu", "none"],
    )
    torch.testing.assert_close(l1.weight.grad, G[0].T @ x)
    torch.testing.assert_close(l1.bias.grad, G[0].sum(0))


def test_fused_errors():
    dfa = dk.DFA()
    with pytest.raises(ValueError, match="activation must be one of"):
        dfa.point(torch.randn(2, 3), activation="softmax")
    with pytest.raises(TypeError, match="nn.Linear"):
        dfa.linear(torch.randn(2, 3), nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"act_inputs\[0\] must be the pre-activation"):
        ops.project_points(torch.randn(2, 3), dk.FeedbackSpec(3, (4,)), activations=["relu"])
    with pytest.raises(ValueError, match=r"act_inputs\[0\] must be a float tensor of shape \[N, 4\]"):
        ops.project_points(
            torch.randn(2, 3), dk.FeedbackSpec(3, (4,)), act_inputs=[torch.randn(2, 5)], activations=["relu"]
        )
    with pytest.raises(ValueError, match="same N"):
        ops.grouped_weight_grad([torch.randn(3, 2)], [torch.randn(4, 2)])


def test_compiled_fused_step_matches_eager():
    tokens, target = torch.randint(0, 11, (3, 4)), torch.randint(0, 5, (3, 4))
    model = Net(dk.DFA(seed=2, backend="cpu"), "linear")
    eager = _grads(model, tokens, target)
    model.zero_grad(set_to_none=True)
    step = torch.compile(lambda t, y: F.cross_entropy(model(t).reshape(-1, 5), y.reshape(-1)), fullgraph=True)
    step(tokens, target).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the ops on every backend
POINT_CASES = [  # (N, out_features, widths, activations)
    (0, 3, (5, 2), ("relu", "none")),
    (1, 1, (1,), ("gelu",)),
    (7, 4, (33, 2, 64), ("tanh", "none", "silu")),
    (67, 17, (40, 31), ("sigmoid", "relu")),
    (1001, 16, (200, 70), ("relu", "gelu")),  # CPU outer product: row chunks, odd last row, column tails
]


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("case", POINT_CASES)
@pytest.mark.parametrize("storage", ["virtual", "materialized"])
@pytest.mark.parametrize("distribution", ["uniform", "rademacher", "gaussian"])
def test_project_points_matches_reference(backend, device, case, storage, distribution):
    N, K, widths, activations = case
    spec = dk.FeedbackSpec(K, widths, seed=7, distribution=distribution)
    e = torch.randn(N, K, device=device)
    acts = [None if a == "none" else torch.randn(N, w, device=device) for w, a in zip(widths, activations)]
    scales = [0.5 + l for l in range(len(widths))]
    got = ops.project_points(e, spec, storage, backend, scales=scales, act_inputs=acts, activations=activations)
    want = reference.project_points(
        e, None, 7, distribution, spec.density, spec.offsets, widths, scales, acts, activations
    )
    tol = dict(atol=1e-4, rtol=1e-4) if distribution == "gaussian" else dict(atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def _per_point(e, B, offsets, widths, scales, acts, activations):
    """Each point's product on its own (what project_points computed before spans were shared)."""
    outs = []
    for off, w, s, a, act in zip(offsets, widths, scales, acts, activations):
        F = (e.float() @ B[:, off : off + w].float()) * s
        outs.append(F if act == "none" else F * reference.activation_grad(a, act))
    return outs


SHARED_CASES = [  # (N, out_features, widths, activations): the shared layout, every point a prefix of B
    (0, 3, (5, 2), ("relu", "none")),
    (7, 4, (33, 2, 64, 64), ("tanh", "none", "silu", "relu")),
    (67, 17, (40, 31, 1, 97), ("sigmoid", "relu", "none", "gelu")),
    (1001, 16, (200, 70, 200), ("relu", "gelu", "none")),  # CPU outer product
    (19, 300, (130, 37, 130), ("none", "gelu", "none")),  # K above one B block's rows on the CPU
]


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("case", SHARED_CASES)
@pytest.mark.parametrize("storage", ["virtual", "materialized"])
@pytest.mark.parametrize("distribution", ["uniform", "rademacher"])
def test_project_points_shared_layout(backend, device, case, storage, distribution):
    """Points that read the same columns share one product (the union of their columns): the
    results match each point's own product, with per-point scales and activations."""
    N, K, widths, activations = case
    spec = dk.FeedbackSpec(K, widths, seed=5, distribution=distribution, layout="shared")
    assert set(spec.offsets) == {0}
    e = torch.randn(N, K, device=device)
    acts = [None if a == "none" else torch.randn(N, w, device=device) for w, a in zip(widths, activations)]
    scales = [0.25 * (l + 1) for l in range(len(widths))]
    got = ops.project_points(e, spec, storage, backend, scales=scales, act_inputs=acts, activations=activations)
    B = reference.feedback_matrix(5, distribution, K, spec.total_width, device=device)
    want = _per_point(e, B, spec.offsets, widths, scales, acts, activations)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in backend_device_pairs() if b != "torch"])
@pytest.mark.parametrize("stored", [False, True])
def test_project_points_overlapping_ranges(backend, device, stored):
    """Any overlap, not just prefixes: ranges that overlap in part, one inside another, a gap
    between spans, a span starting off a 32-column boundary, a zero-width point."""
    prefix = "triton_" if backend == "triton" else ""
    offsets, widths = [3, 20, 30, 100, 101, 7], [40, 5, 45, 33, 2, 0]
    acts = ["relu", "none", "gelu", "silu", "none", "none"]
    N, K = 21, 6
    e = torch.randn(N, K, device=device)
    pre = [None if a == "none" else torch.randn(N, w, device=device) for w, a in zip(widths, acts)]
    scales = [0.5, -1.0, 2.0, 0.125, 3.0, 1.0]
    B = reference.feedback_matrix(9, "rademacher", K, 140, device=device)
    got = getattr(torch.ops.dfa_kernels, f"{prefix}project_points")(
        e, B if stored else None, 9, "rademacher", 0.1, offsets, widths, scales, pre, acts, None
    )
    want = _per_point(e, B, offsets, widths, scales, pre, acts)
    assert reference.column_spans(offsets, widths) == [(3, 75), (100, 133)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    ref = reference.project_points(e, B if stored else None, 9, "rademacher", 0.1, offsets, widths, scales, pre, acts)
    for r, w in zip(ref, want):
        torch.testing.assert_close(r, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_project_points_dtypes(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 Triton is tested on a GPU")
    spec = dk.FeedbackSpec(10, (24, 9), seed=1, distribution="rademacher")
    e = torch.randn(13, 10, device=device).to(dtype)
    acts = [torch.randn(13, 24, device=device).to(dtype), None]
    got = ops.project_points(
        e, spec, "virtual", backend, act_inputs=acts, activations=["gelu", "none"], out_dtype=torch.float32
    )
    want = reference.project_points(
        e, None, 1, "rademacher", 0.1, spec.offsets, spec.widths, spec.scales(), acts, ["gelu", "none"], torch.float32
    )
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_weight_grad_matches_reference(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 Triton is tested on a GPU")
    shapes = [(0, 3, 4), (1, 1, 1), (37, 5, 9), (130, 33, 17)]  # (N, out, in)
    grads = [torch.randn(n, o, device=device).to(dtype) for n, o, _ in shapes]
    inputs = [torch.randn(n, i, device=device).to(dtype) for n, _, i in shapes]
    got = ops.grouped_weight_grad(grads, inputs, backend, out_dtype=torch.float32)
    want = reference.grouped_weight_grad(grads, inputs, torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for g, w, (_, o, i) in zip(got, want, shapes):
        assert g.shape == (o, i)
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in backend_device_pairs() if b != "torch"])
def test_new_ops_opcheck(backend, device):
    prefix = "triton_" if backend == "triton" else ""
    e = torch.randn(6, 5, device=device, requires_grad=True)
    a = torch.randn(6, 7, device=device, requires_grad=True)
    b = torch.randn(6, 3, device=device, requires_grad=True)
    for B in (None, torch.randn(5, 12, device=device, requires_grad=True)):
        torch.library.opcheck(
            getattr(torch.ops.dfa_kernels, f"{prefix}project_points").default,
            (e, B, 4, "uniform", 0.1, [0, 7], [7, 3], [0.5, 2.0], [a, b], ["gelu", "tanh"], None),
        )
        torch.library.opcheck(
            getattr(torch.ops.dfa_kernels, f"{prefix}project_points").default,
            (e, B, 4, "uniform", 0.1, [0, 2], [7, 3], [1.0, 1.0], [a, None], ["relu", "none"], None),
        )
    g = [torch.randn(9, 4, device=device, requires_grad=True), torch.randn(2, 3, device=device)]
    x = [torch.randn(9, 6, device=device), torch.randn(2, 5, device=device, requires_grad=True)]
    torch.library.opcheck(getattr(torch.ops.dfa_kernels, f"{prefix}grouped_weight_grad").default, (g, x, None))


@pytest.mark.filterwarnings("ignore:Input #")  # the op is fp32-only; the tolerance below accounts for it
def test_project_points_gradcheck():
    e = torch.randn(4, 3, dtype=torch.float64).float().requires_grad_()
    a, a2 = torch.randn(4, 6).requires_grad_(), torch.randn(4, 2).requires_grad_()

    def f(e, a, a2):
        return torch.ops.dfa_kernels.project_points(
            e, None, 2, "uniform", 0.1, [0, 6], [6, 2], [1.0, 0.5], [a, a2], ["gelu", "silu"], None
        )

    # fp32 op: gradcheck with a loose tolerance against finite differences
    torch.autograd.gradcheck(f, (e, a, a2), eps=1e-3, atol=1e-2, rtol=1e-2, nondet_tol=1e-5)


def test_auto_backend_reads_the_measured_table(monkeypatch, tmp_path):
    available = dk.available_backends("cpu")
    if len(available) < 2:
        pytest.skip("one backend only: nothing to choose")
    slow_first = available[-1]  # a table that names the last backend must win over the default order
    (tmp_path / f"{ops.device_slug('cpu')}.json").write_text(
        json.dumps(
            {"device": "cpu", "choices": {"project|virtual|narrow": slow_first, "project|virtual|wide": "no-such"}}
        )
    )
    monkeypatch.setattr(ops, "BACKEND_TABLES", tmp_path)
    ops.backend_table.cache_clear()
    try:
        assert ops.resolve_backend("auto", "cpu", "project", "virtual", 4) == slow_first
        assert ops.resolve_backend("auto", "cpu", "project", "virtual", 5000) == available[0]  # not available
        assert ops.resolve_backend("auto", "cpu", "project", "materialized", 4) == available[0]  # not measured
        assert ops.resolve_backend("auto", "cpu") == available[0]
    finally:
        ops.backend_table.cache_clear()


def test_auto_backend_without_a_table_prefers_tensor_cores_for_project_points(monkeypatch):
    """On a GPU with no measured table, project_points goes to Triton (tensor cores) rather than
    CUDA's SIMT tile; the other ops take the first available backend. (Simulated: no GPU needed.)"""
    monkeypatch.setattr(ops, "device_slug", lambda device: "unmeasured_gpu")
    for available, points_backend in ((["cuda", "triton", "torch"], "triton"), (["cuda", "torch"], "cuda")):
        monkeypatch.setattr(ops, "available_backends", lambda device, found=available: list(found))
        assert ops.resolve_backend("auto", "cuda", "project_points", "virtual", 768) == points_backend
        assert ops.resolve_backend("auto", "cuda", "project", "virtual", 768) == "cuda"
        assert ops.resolve_backend("auto", "cuda") == "cuda"
