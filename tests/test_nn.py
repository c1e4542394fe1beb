"""DFA/BP/shallow gradients against hand-written references computed from feedback_matrices()."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dfa_kernels as dk


class MLP(nn.Module):
    def __init__(self, dfa, sizes=(6, 16, 12, 10, 3)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dfa = dfa

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.dfa.point(torch.tanh(layer(x)))
        return self.dfa(self.layers[-1](x))


def _loss(y, target):
    return F.cross_entropy(y.reshape(-1, y.shape[-1]), target.reshape(-1))


def _reference_grads(model, x, target, mode):
    """Gradients by hand: e from the loss, G_l = e @ B_l (scaled), each layer through its own tanh."""
    layers = model.layers
    hs, a = [x], x
    for layer in layers[:-1]:
        a = torch.tanh(layer(a)).detach()
        hs.append(a)
    y = layers[-1](hs[-1]).detach().requires_grad_()
    (e,) = torch.autograd.grad(_loss(y, target), y)
    e_flat = e.reshape(-1, e.shape[-1])
    grads = {}
    head = layers[-1]
    gw, gb = torch.autograd.grad(head(hs[-1]), [head.weight, head.bias], e)
    grads[id(head.weight)], grads[id(head.bias)] = gw, gb
    if mode == "shallow":
        return grads
    for l, (layer, B) in enumerate(zip(layers[:-1], model.dfa.feedback_matrices())):
        G = (e_flat @ B).reshape(hs[l + 1].shape)
        gw, gb = torch.autograd.grad(torch.tanh(layer(hs[l])), [layer.weight, layer.bias], G)
        grads[id(layer.weight)], grads[id(layer.bias)] = gw, gb
    return grads


def _model_grads(model, x, target):
    model.zero_grad(set_to_none=True)
    _loss(model(x), target).backward()
    return {id(p): p.grad for p in model.parameters()}


BACKENDS = dk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", dk.LAYOUTS)
@pytest.mark.parametrize("distribution", dk.DISTRIBUTIONS)
def test_dfa_gradients_match_hand_reference(backend, layout, distribution):
    model = MLP(dk.DFA(seed=4, layout=layout, distribution=distribution, backend=backend))
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))
    got = _model_grads(model, x, target)
    want = _reference_grads(model, x, target, "dfa")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    # the scale: 1/sqrt(d_l) per point (independent) or 1/sqrt(max d) (shared)
    B = model.dfa.spec.matrix()
    for Bl, w, off in zip(model.dfa.feedback_matrices(), (16, 12, 10), model.dfa.spec.offsets):
        s = 1 / math.sqrt(w if layout == "independent" else 16)
        torch.testing.assert_close(Bl, B[:, off : off + w] * s)


def test_bp_mode_gives_exact_gradients_and_shallow_only_trains_the_head():
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model = MLP(dk.DFA(mode="bp"))
    plain = MLP(dk.DFA(mode="bp"))
    plain.load_state_dict(model.state_dict())
    got = _model_grads(model, x, target)

    def plain_forward(x):  # the same network with no DFA at all
        for layer in plain.layers[:-1]:
            x = torch.tanh(layer(x))
        return plain.layers[-1](x)

    _loss(plain_forward(x), target).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(got[id(p)], q.grad)

    model.dfa.mode = "shallow"  # switched on the live model
    got = _model_grads(model, x, target)
    want = _reference_grads(model, x, target, "shallow")
    for layer in model.layers[:-1]:
        assert layer.weight.grad is None and layer.bias.grad is None
    for p in model.layers[-1].parameters():
        torch.testing.assert_close(got[id(p)], want[id(p)])

    model.dfa.mode = "dfa"
    got = _model_grads(model, x, target)
    want = _reference_grads(model, x, target, "dfa")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


class _CountMM(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_no_input_gradient_gemm_between_points(backend):
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for mode, expected in (("dfa", 4), ("bp", 4 + 3)):
        model = MLP(dk.DFA(mode=mode, backend=backend))
        loss = _loss(model(x), target)
        with _CountMM() as counter:
            loss.backward()
        # one weight-gradient GEMM per layer; BP also runs an input-gradient GEMM per hidden layer
        assert len(counter.shapes) == expected, (mode, counter.shapes)


def test_token_and_field_points():
    # [B, T, d] points under a [B, T, k] error
    dfa = dk.DFA(seed=1)
    emb, lin, head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 5)
    tokens = torch.randint(0, 20, (3, 7))
    h = dfa.point(emb(tokens))
    h = dfa.point(torch.relu(lin(h)))
    y = dfa(head(h))
    (e,) = torch.autograd.grad(_loss(y, torch.randint(0, 5, (3, 7))), y, retain_graph=True)
    assert dfa.spec.widths == (8, 8) and dfa.spec.out_features == 5
    _loss(y, torch.randint(0, 5, (3, 7)))  # graph still fine
    # [B, fields, d] points under a [B, 1] error: width = fields * d
    dfa = dk.DFA(seed=2)
    fields = torch.randn(4, 3, 5, requires_grad=True)
    p = dfa.point(fields * 2)
    y = dfa(p.sum(dim=(1, 2)).unsqueeze(-1))
    y.sum().backward()
    assert dfa.spec.widths == (15,)
    B = dfa.feedback_matrices()[0]
    torch.testing.assert_close(fields.grad, 2 * (torch.ones(4, 1) @ B).reshape(4, 3, 5))


def test_bad_points_and_changing_widths():
    dfa = dk.DFA()
    with pytest.raises(ValueError, match="must start with the output's batch dims"):
        dfa.point(torch.randn(4, 8, requires_grad=True))
        dfa(torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 2-D"):
        dfa.point(torch.randn(4, 8))
        dfa(torch.randn(4))
    with pytest.raises(RuntimeError, match="no feedback point recorded"):
        dfa(torch.randn(4, 2))
    dfa.point(torch.randn(4, 8))
    dfa(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"widths \[8\], but this forward pass has out_features=2 and widths \[9\]"):
        dfa.point(torch.randn(4, 9))
        dfa(torch.randn(4, 2))
    dfa.reset()
    dfa.point(torch.randn(4, 9))
    dfa(torch.randn(4, 2))
    for kwargs, match in (
        ({"mode": "backprop"}, "mode must be one of"),
        ({"distribution": "x"}, "distribution"),
        ({"layout": "x"}, "layout"),
        ({"scale": "x"}, "scale must be"),
        ({"storage": "x"}, "storage"),
        ({"backend": "x"}, "backend"),
    ):
        with pytest.raises(ValueError, match=match):
            dk.DFA(**kwargs)
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        dfa.point([1.0])


def test_non_finite_error_sends_no_feedback_and_the_next_forward_raises():
    """Checked on the device (no sync): the step's gradients from the DFA output are all zero,
    counted; the next forward raises FloatingPointError, once; the run can go on after it."""
    model = MLP(dk.DFA())
    x = torch.randn(8, 6)
    (model(x) * float("nan")).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    assert model.dfa.nonfinite_steps == 1
    with pytest.raises(FloatingPointError, match=r"NaN or Inf \(1 so far\)"):
        model(x)
    model.zero_grad()
    model(x).sum().backward()  # reported once: the next steps run
    assert model.layers[0].weight.grad.abs().sum() > 0 and model.dfa.nonfinite_steps == 1
    unchecked = MLP(dk.DFA(check_finite=False))
    (unchecked(x) * float("nan")).sum().backward()
    assert torch.isnan(unchecked.layers[0].weight.grad).all()
    unchecked(x)


def test_non_finite_loss_of_the_fused_head():
    dfa = dk.DFA()
    layer, head = nn.Linear(6, 8), nn.Linear(8, 5)
    h = dfa.point(torch.relu(layer(torch.randn(4, 6))))
    loss = dfa.linear_cross_entropy(h * float("inf"), head, torch.randint(0, 5, (4,)))
    loss.backward()
    assert not torch.isfinite(loss)
    assert not layer.weight.grad.any() and not head.weight.grad.any()
    dfa.point(torch.relu(layer(torch.randn(4, 6))))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        dfa.linear_cross_entropy(h, head, torch.randint(0, 5, (4,)))


def test_state_dict_holds_the_spec_not_the_matrix():
    model = MLP(dk.DFA(seed=123, distribution="rademacher"))
    model(torch.randn(2, 6))
    state = model.state_dict()
    assert not any(
        v.numel() == model.dfa.spec.out_features * model.dfa.spec.total_width
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == 3
    )
    restored = MLP(dk.DFA())
    restored.load_state_dict(state)
    assert restored.dfa.spec == model.dfa.spec
    for a, b in zip(restored.dfa.feedback_matrices(), model.dfa.feedback_matrices()):
        assert torch.equal(a, b)


def test_tinydfa_preset_matches_tinydfa_formulas():
    dfa = dk.DFA.tinydfa(seed=9)
    lin1, lin2, head = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(3, 5)
    x = torch.randn(2, 7, 4)  # [B, T, d]: TinyDFA flattens everything but the first dim
    h1 = torch.relu(lin1(x))
    h2 = torch.relu(lin2(dfa.point(h1)))
    y = dfa(head(dfa.point(h2)))
    e = torch.randn(2, 7, 5)
    y.backward(e)
    # TinyDFA: B = U[-1, 1) of [prod(out dims), max(prod(point dims))], grad = e_flat @ B[:, :d] / sqrt(max d)
    B = dfa.spec.matrix()
    assert B.shape == (35, 42) and B.min() >= -1 and B.max() < 1
    rp = e.reshape(2, -1) @ B / math.sqrt(42)
    (g1,) = torch.autograd.grad(torch.relu(lin1(x)), lin1.weight, rp[:, :42].reshape(2, 7, 6))
    (g2,) = torch.autograd.grad(torch.relu(lin2(h1.detach())), lin2.weight, rp[:, :21].reshape(2, 7, 3))
    torch.testing.assert_close(lin1.weight.grad, g1)
    torch.testing.assert_close(lin2.weight.grad, g2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compiled_training_step_matches_eager(backend):
    torch.manual_seed(0)
    model = MLP(dk.DFA(seed=5, backend=backend, storage="virtual"))
    x, target = torch.randn(16, 6), torch.randint(0, 3, (16,))

    eager = _model_grads(model, x, target)
    model.zero_grad(set_to_none=True)
    # forward + loss in one graph; AOTAutograd compiles the matching backward (with the projection)
    compiled_loss = torch.compile(lambda x, target: _loss(model(x), target), fullgraph=True)
    compiled_loss(x, target).backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, eager[id(p)], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------ the error's dtype under autocast
class _AutocastMLP(nn.Module):
    """Points under autocast (bf16), the head's output in fp32 as an LM's final layers; `fused`
    uses dfa.linear and an activation point, else plain points."""

    def __init__(self, dfa, fused):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)
        self.dfa, self.fused = dfa, fused

    def forward(self, x):
        if self.fused:
            h = self.dfa.linear(x, self.fc1, "relu")
            h = self.dfa.point(self.fc2(h), activation="tanh")
        else:
            h = self.dfa.point(torch.relu(self.fc1(x)))
            h = self.dfa.point(torch.tanh(self.fc2(h)))
        return self.dfa(self.head(h).float())


def _record_projections(monkeypatch):
    """Patches the projection ops to record (op, e.dtype, output dtypes) of each call."""
    calls = []
    for name in ("project", "project_points"):
        original = getattr(dk.ops, name)

        def recording(e, *args, _original=original, _name=name, **kwargs):
            out = _original(e, *args, **kwargs)
            outs = out if isinstance(out, list) else [out]
            calls.append((_name, e.dtype, {o.dtype for o in outs}))
            return out

        monkeypatch.setattr(dk.ops, name, recording)
    return calls


@pytest.mark.parametrize("fused", [False, True])
def test_error_is_projected_in_bf16_under_bf16_autocast(monkeypatch, fused):
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))
    grads = {}
    for error_dtype in ("auto", None):
        torch.manual_seed(0)
        model = _AutocastMLP(dk.DFA(seed=3, error_dtype=error_dtype), fused)
        calls = _record_projections(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model(x).float(), target)
        loss.backward()
        monkeypatch.undo()
        ((op, e_dtype, out_dtypes),) = calls
        assert op == ("project_points" if fused else "project")
        # "auto": e (fp32 after the fp32 head) is cast to bf16; None: projected in fp32. Either way the
        # projection writes the points' dtype (bf16 under autocast) itself.
        assert e_dtype == (torch.bfloat16 if error_dtype == "auto" else torch.float32)
        assert out_dtypes == {torch.bfloat16}
        grads[error_dtype] = [p.grad.clone() for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads[error_dtype])
    for g_bf16, g_fp32 in zip(grads["auto"], grads[None]):  # only e's rounding to bf16 differs
        torch.testing.assert_close(g_bf16, g_fp32, atol=2e-2 * g_fp32.abs().max().item(), rtol=0)


def test_error_dtype_outside_autocast_and_explicit(monkeypatch):
    x, target = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for error_dtype, expected in (
        ("auto", torch.float32),
        (None, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ):
        model = MLP(dk.DFA(error_dtype=error_dtype))
        calls = _record_projections(monkeypatch)
        _loss(model(x), target).backward()
        monkeypatch.undo()
        assert [c[1] for c in calls] == [expected]
        assert calls[0][2] == {torch.float32}  # fp32 points get fp32 gradients
    with pytest.raises(ValueError, match="error_dtype must be 'auto', None or one of"):
        dk.DFA(error_dtype=torch.float64)
    with pytest.raises(ValueError, match="error_dtype"):
        dk.DFA(error_dtype="bf16")


def test_linear_cross_entropy_projects_bf16_chunks_under_autocast(monkeypatch):
    torch.manual_seed(0)
    dfa = dk.DFA(seed=1)
    fc, head = nn.Linear(8, 16), nn.Linear(16, 50)
    x, target = torch.randn(12, 8), torch.randint(0, 50, (12,))
    calls = _record_projections(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = dfa.linear(x, fc, "gelu")
        loss = dfa.linear_cross_entropy(h, head, target)
    loss.backward()
    assert calls and all(e_dtype == torch.bfloat16 and outs == {torch.bfloat16} for _, e_dtype, outs in calls)
    assert fc.weight.grad is not None and torch.isfinite(fc.weight.grad).all()


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_autocast_step_with_auto_backend_matches_eager(fused):
    """backend="auto" is resolved at trace time (its table lookup and log are not traceable) and
    the autocast state is read while tracing: fullgraph compiles and matches eager."""
    torch.manual_seed(0)
    model = _AutocastMLP(dk.DFA(seed=3), fused)
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def step(x, target):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss(model(x).float(), target)

    step(x, target).backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch.compile(step, fullgraph=True)(x, target).backward()
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, atol=1e-2 * g.abs().max().item(), rtol=0)
