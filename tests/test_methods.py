"""The direct methods (sdfa, drtp, ternary, dkp) against plain-PyTorch oracles given the same matrices.

The oracles follow the methods' reference code, not this library: DRTP's repository
(ChFrenkel/DirectRandomTargetProjection, function.py: a point's gradient is sign(y - labels) @ B for
sDFA, labels @ B for DRTP, y the softmax output for a cross-entropy loss) and the DKP repository
(webstah/dkp-gist, utils/gradfunctions.py: a point's gradient is e @ B, B's gradient e^T h). Each
layer's gradients come from autograd on that layer alone, fed the point's signal.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk
from dfa_kernels import methods

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = [b for b in dk.available_backends("cpu") if b in ("cpu", "torch")]
CLASSES = 5


# ---------------------------------------------------------------- the method space
def test_every_mode_is_one_point_of_the_method_space():
    assert (
        set(dk.MODES)
        == set(dk.METHODS)
        >= {"dfa", "bp", "shallow", "sdfa", "drtp", "ternary", "dkp", "fa", "usf", "brsf", "frsf"}
    )
    for name, m in dk.METHODS.items():
        assert m.name == name and m.signal in methods.SIGNALS
        assert (m.entry is None) == (name in ("bp", "shallow"))
    assert set(methods.DIRECT) == {"dfa", "sdfa", "drtp", "ternary", "dkp", "fdfa"}
    assert set(methods.LAYERWISE) == {"fa", "usf", "brsf", "frsf"}
    for mode in dk.MODES:
        assert dk.DFA(mode=mode).method is dk.METHODS[mode]
    with pytest.raises(ValueError, match="mode must be one of .*'drtp'"):
        dk.DFA(mode="DRTP")


def test_ternarize_is_the_documented_rule():
    e = torch.tensor([[0.5, -0.04, 0.06, -0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [-1e-3, 2e-4, 5e-5, -9e-5, 5e-4]])
    expected = torch.tensor(
        [
            [1.0, 0.0, 1.0, -1.0, 0.0],  # kept where |e| >= 0.1 * 0.5
            [0.0, 0.0, 0.0, 0.0, 0.0],  # a zero row sends nothing
            [-1.0, 1.0, 0.0, 0.0, 1.0],
        ]
    )  # relative to the row's own max: scale-free
    assert torch.equal(methods.ternarize(e, 0.1), expected)
    assert torch.equal(methods.ternarize(e, 0.0), torch.sign(e))
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="threshold"):
            dk.DFA(mode="ternary", threshold=bad)


# ---------------------------------------------------------------- models and oracles
class MLP(nn.Module):
    def __init__(self, dfa, sizes=(6, 16, 12, CLASSES), fused=False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dfa, self.fused = dfa, fused

    def forward(self, x, target=None):
        for layer in self.layers[:-1]:
            x = self.dfa.point(layer(x), "tanh") if self.fused else self.dfa.point(torch.tanh(layer(x)))
        return self.dfa(self.layers[-1](x), target=target)

    def blocks(self):
        return [lambda h, layer=layer: torch.tanh(layer(h)) for layer in self.layers[:-1]], self.layers[-1]


class CNN(nn.Module):
    """Points on a convolution's output [N, C, H, W] (width C*H*W) and on a linear layer's."""

    def __init__(self, dfa):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 8)
        self.head = nn.Linear(8, CLASSES)
        self.dfa = dfa

    def forward(self, x, target=None):
        h = self.dfa.point(torch.relu(self.conv(x)))
        h = self.dfa.point(torch.relu(self.fc(h.flatten(1))))
        return self.dfa(self.head(h), target=target)

    def blocks(self):
        return [lambda h: torch.relu(self.conv(h)), lambda h: torch.relu(self.fc(h.flatten(1)))], self.head


def reference_signal(mode, y, e, target, threshold):
    """What each point's B multiplies, as the reference code computes it."""
    labels = F.one_hot(target, CLASSES).float()
    if mode == "sdfa":  # DRTP's function.py: torch.sign(y - labels), y = softmax(output) under CE
        return torch.sign(torch.softmax(y, 1) - labels)
    if mode == "drtp":  # labels.mm(B)
        return labels
    if mode == "ternary":  # the documented rule, row by row
        rows = []
        for row in e:
            cut = threshold * row.abs().max()
            rows.append(torch.tensor([float(torch.sign(v)) if abs(v) >= cut else 0.0 for v in row]))
        return torch.stack(rows)
    return e  # dfa, dkp


def oracle_grads(model, x, target, mode, Bs, threshold=0.5):
    """Every parameter's gradient: the head by autograd from e, each block from signal @ B_l alone."""
    blocks, head = model.blocks()
    hs = [x]
    for block in blocks:
        hs.append(block(hs[-1]).detach())
    y = head(hs[-1]).detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(y, target), y)
    grads = dict(zip(("head.w", "head.b"), torch.autograd.grad(head(hs[-1]), [head.weight, head.bias], e)))
    signal = reference_signal(mode, y.detach(), e, target, threshold)
    for l, (block, B) in enumerate(zip(blocks, Bs)):
        out = block(hs[l])
        params = [p for p in model.parameters() if p is not head.weight and p is not head.bias]
        g = torch.autograd.grad(out, params, (signal @ B).reshape(out.shape), allow_unused=True)
        for p, gp in zip(params, g):
            if gp is not None:
                grads[id(p)] = gp
    grads[id(head.weight)], grads[id(head.bias)] = grads.pop("head.w"), grads.pop("head.b")
    return grads, e, hs


def model_grads(model, x, target):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, target), target).backward()
    return {id(p): p.grad for p in model.parameters() if p is not getattr(model.dfa, "feedback", None)}


def assert_grads_equal(got, expected, atol=1e-5, rtol=1e-4):
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], atol=atol, rtol=rtol)


# ---------------------------------------------------------------- direct methods against their oracles
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sdfa", "drtp", "ternary", "dkp"])
@pytest.mark.parametrize("net", ["mlp", "mlp-fused", "cnn"])
def test_direct_methods_equal_their_oracles(mode, net, backend):
    torch.manual_seed(1)
    dfa = dk.DFA(mode=mode, backend=backend, threshold=0.5)  # 0.5: at init, 0.1 keeps every entry (= sdfa)
    model = CNN(dfa) if net == "cnn" else MLP(dfa, fused=net == "mlp-fused")
    x = torch.randn(7, 2, 8, 8) if net == "cnn" else torch.randn(7, 6)
    target = torch.randint(0, CLASSES, (7,))
    got = model_grads(model, x, target)
    expected, e, hs = oracle_grads(model, x, target, mode, dfa.feedback_matrices())
    assert_grads_equal(got, expected)
    if mode == "dkp":  # grad_weights_B = grad_at_output.t().mm(layer_out_view), h after the activation
        B_grads = [e.T @ h.flatten(1) for h in hs[1:]]
        torch.testing.assert_close(dfa.feedback.grad, torch.cat(B_grads, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sdfa", "drtp", "ternary"])
def test_direct_methods_in_bf16(mode):
    """bf16 points and output: the signal (exact: +-1, 0, one-hot) projected in bf16 against the fp32 oracle."""
    torch.manual_seed(2)
    dfa = dk.DFA(mode=mode, threshold=0.5)
    model = MLP(dfa, sizes=(6, 32, 16, CLASSES)).to(torch.bfloat16)
    x, target = torch.randn(9, 6, dtype=torch.bfloat16), torch.randint(0, CLASSES, (9,))
    got = model_grads(model, x, target)
    reference = MLP(dk.DFA(mode=mode), sizes=(6, 32, 16, CLASSES))
    reference.load_state_dict(model.float().state_dict())
    expected, _, _ = oracle_grads(reference, x.float(), target, mode, dfa.feedback_matrices())
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got[id(p)].float(), expected[id(q)], atol=0.05, rtol=0.05)


def test_methods_differ_and_switch_live():
    """One model, one DFA: each mode's signal is its own (a wrong signal would match another's)."""
    torch.manual_seed(3)
    dfa = dk.DFA(threshold=0.5)
    model = MLP(dfa)
    x, target = torch.randn(8, 6), torch.randint(0, CLASSES, (8,))
    seen = {}
    for mode in ["dfa", "sdfa", "drtp", "ternary", "dfa"]:
        dfa.mode = mode
        got = model_grads(model, x, target)
        first = got[id(model.layers[0].weight)]
        expected, _, _ = oracle_grads(model, x, target, mode, dfa.feedback_matrices())
        assert_grads_equal(got, expected)
        for other, g in seen.items():
            assert torch.equal(g, first) == (other == mode)
        seen[mode] = first


def test_drtp_targets_by_call_by_targets_and_as_float():
    torch.manual_seed(4)
    dfa = dk.DFA(mode="drtp")
    model = MLP(dfa)
    x, target = torch.randn(6, 6), torch.randint(0, CLASSES, (6,))
    by_call = model_grads(model, x, target)
    model.zero_grad(set_to_none=True)
    dfa.targets(target)  # a converted model's forward does not take targets
    F.cross_entropy(model(x), target).backward()
    assert_grads_equal({id(p): p.grad for p in model.parameters()}, by_call, atol=0, rtol=0)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, F.one_hot(target, CLASSES).float()), target).backward()
    assert_grads_equal({id(p): p.grad for p in model.parameters()}, by_call, atol=0, rtol=0)


def test_drtp_ignored_rows_send_nothing():
    torch.manual_seed(5)
    dfa = dk.DFA(mode="drtp")
    with dfa.capture() as cap:
        h = dfa.point(torch.randn(4, 3, requires_grad=True))
        y = dfa(h @ torch.randn(3, CLASSES), target=torch.tensor([1, -100, 0, 4]))
        y.sum().backward()
    (signal,) = cap.signals
    (B,) = dfa.feedback_matrices()
    torch.testing.assert_close(
        signal, F.one_hot(torch.tensor([1, 0, 0, 4]), CLASSES).float() @ B * torch.tensor([1.0, 0.0, 1.0, 1.0])[:, None]
    )


def test_drtp_without_targets_refuses_naming_them():
    dfa = dk.DFA(mode="drtp")
    model = MLP(dfa)
    x, target = torch.randn(4, 6), torch.randint(0, CLASSES, (4,))
    with pytest.raises(
        ValueError,
        match=r"mode 'drtp' projects the class targets.*dfa\(y, target=t\).*"
        r"dfa\.targets\(t\)",
    ):
        model(x)
    with torch.no_grad():  # evaluation needs no targets
        model(x)
    for bad, match in (
        (target[:3], "class targets must be integer indices shaped like"),
        (torch.randn(4, 3), "a float target must have y's shape"),
        (target.bool(), "class targets must be integer"),
    ):
        with pytest.raises(ValueError, match=match):
            model(x, bad)
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        dfa.targets([1, 2, 3, 4])


def test_targets_are_ignored_by_the_other_modes():
    torch.manual_seed(6)
    x, target = torch.randn(5, 6), torch.randint(0, CLASSES, (5,))
    model = MLP(dk.DFA(mode="dfa"))
    with_target = model_grads(model, x, target)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), target).backward()
    assert_grads_equal({id(p): p.grad for p in model.parameters()}, with_target, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["sdfa", "drtp", "ternary"])
def test_linear_cross_entropy_sends_the_same_signal_as_the_output_op(mode):
    """The chunked LM head (error after the head, no [N, vocab] logits) against dfa(head(hidden))."""
    torch.manual_seed(7)
    V = 11

    def run(chunked):
        torch.manual_seed(8)
        dfa = dk.DFA(mode=mode)
        layer, head = nn.Linear(6, 12), nn.Linear(12, V)
        x, target = torch.randn(2, 5, 6), torch.randint(0, V, (2, 5))
        target[0, 1] = -100
        h = dfa.point(torch.tanh(layer(x)))
        if chunked:
            loss = dfa.linear_cross_entropy(h, head, target)
        else:
            loss = F.cross_entropy(dfa(head(h), target=target).reshape(-1, V), target.reshape(-1))
        loss.backward()
        return [layer.weight.grad, layer.bias.grad, head.weight.grad]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- dkp
def test_dkp_gradients_and_learned_matrix_follow_the_reference_over_steps():
    """Three SGD steps: W and B both move; the oracle updates B by e^T h itself (dkp-gist's rule)."""
    torch.manual_seed(9)
    dfa = dk.DFA(mode="dkp")
    model = MLP(dfa)
    x, target = torch.randn(8, 6), torch.randint(0, CLASSES, (8,))
    with torch.no_grad():  # the reference too runs once to make its matrices before the optimizers
        model(x)
    oracle = MLP(dk.DFA())
    oracle.load_state_dict({k: v for k, v in model.state_dict().items() if k != "dfa.feedback"}, strict=False)
    Bs = [B.clone() for B in dfa.feedback_matrices()]
    torch.testing.assert_close(torch.cat(Bs, 1), torch.cat(dfa.feedback_matrices(fixed=True), 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    oracle_opt = torch.optim.SGD(oracle.parameters(), lr=0.5)
    assert any(p is dfa.feedback for p in model.parameters())
    for _ in range(3):
        got = model_grads(model, x, target)
        expected, e, hs = oracle_grads(oracle, x, target, "dkp", Bs)
        assert_grads_equal(got, {id(p): expected[id(q)] for p, q in zip(model.parameters(), oracle.parameters())})
        B_grads = [e.T @ h for h in hs[1:]]  # grad_weights_B = grad_at_output.t().mm(layer_out_view)
        torch.testing.assert_close(dfa.feedback.grad, torch.cat(B_grads, 1), atol=1e-6, rtol=1e-5)
        opt.step()
        for q in oracle.parameters():
            q.grad = expected[id(q)]
        oracle_opt.step()
        Bs = [B - 0.5 * g for B, g in zip(Bs, B_grads)]
        torch.testing.assert_close(torch.cat(dfa.feedback_matrices(), 1), torch.cat(Bs, 1))
    assert not torch.allclose(torch.cat(Bs, 1), torch.cat(dfa.feedback_matrices(fixed=True), 1))


def test_dkp_shared_layout_and_state_dict():
    torch.manual_seed(10)
    dfa = dk.DFA.tinydfa(mode="dkp")
    model = MLP(dfa, sizes=(6, 16, 12, CLASSES))
    x, target = torch.randn(5, 6), torch.randint(0, CLASSES, (5,))
    got = model_grads(model, x, target)
    expected, e, hs = oracle_grads(model, x, target, "dkp", dfa.feedback_matrices())
    assert_grads_equal(got, expected)
    grad_B = torch.zeros(CLASSES, 16)
    for h in hs[1:]:  # shared columns: each point's rule adds into its prefix
        grad_B[:, : h.shape[1]] += e.T @ h
    torch.testing.assert_close(dfa.feedback.grad, grad_B)
    with torch.no_grad():
        dfa.feedback.add_(1.0)
    fresh = MLP(dk.DFA.tinydfa(mode="dkp"))
    fresh.load_state_dict(model.state_dict())  # the learned matrix is made by the load
    torch.testing.assert_close(fresh.dfa.feedback, dfa.feedback)


def test_dkp_refuses_what_cannot_hold_a_learned_matrix():
    with pytest.raises(ValueError, match=r"mode 'dkp' .*storage='virtual'"):
        dk.DFA(mode="dkp", storage="virtual")
    dfa = dk.DFA(storage="virtual")
    with pytest.raises(ValueError, match="storage='virtual'"):
        dfa.mode = "dkp"
    dfa = dk.DFA(mode="dkp")
    dfa.point(torch.randn(2, 3, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"mode 'dkp' materializes its learned B \[vocab, D\]"):
        dfa.linear_cross_entropy(torch.randn(2, 3, 4), nn.Linear(4, 7), torch.zeros(2, 3, dtype=torch.long))
