"""FDFA (Forward Direct Feedback Alignment, Bacho & Chu 2023) against a plain-PyTorch oracle.

The oracle follows the reference code (Florian-BACHO/FDFA: utils/DFATrainingHook.py and
OutputTrainingHook.py), not this library: one training forward in dual tensors (the input's tangent
zero); after each hidden layer's activation the hook adds a fresh ``randn_like`` perturbation u_l to
the tangent it passes on; the output hook keeps y's tangent d; in the backward a hook's input gets
``e @ B_l`` and B_l's gradient is ``B_l - mean_n(d_n u_l,n^T)``. The same seed draws the same u_l (one
draw per point, in forward order), so the gradients must match.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = [b for b in dk.available_backends("cpu") if b in ("cpu", "torch")]
CLASSES = 5


class MLP(nn.Module):
    """Points after tanh: plain (the oracle's hook position), fused (the pre-activation recorded)
    or dfa.linear (the layer owned by the point)."""

    def __init__(self, dfa, kind="plain", sizes=(6, 16, 12, CLASSES)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dfa, self.kind = dfa, kind

    def forward(self, x):
        for layer in self.layers[:-1]:
            if self.kind == "linear":
                x = self.dfa.linear(x, layer, "tanh")
            elif self.kind == "fused":
                x = self.dfa.point(layer(x), "tanh")
            else:
                x = self.dfa.point(torch.tanh(layer(x)))
        return self.dfa(self.layers[-1](x))

    def blocks(self):
        return [lambda h, layer=layer: torch.tanh(layer(h)) for layer in self.layers[:-1]], self.layers[-1]


class CNN(nn.Module):
    """A point on a convolution's output [N, C, H, W] and one on a linear layer's."""

    def __init__(self, dfa, kind="plain"):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 8)
        self.head = nn.Linear(8, CLASSES)
        self.dfa = dfa

    def forward(self, x):
        h = self.dfa.point(torch.relu(self.conv(x)))
        h = self.dfa.point(torch.relu(self.fc(h.flatten(1))))
        return self.dfa(self.head(h))

    def blocks(self):
        return [lambda h: torch.relu(self.conv(h)), lambda h: torch.relu(self.fc(h.flatten(1)))], self.head


def oracle(model, x, target, Bs, seed):
    """The reference's FDFA step on `model`'s layers: every parameter's gradient and each B_l's."""
    blocks, head = model.blocks()
    torch.manual_seed(seed)
    outs, us = [], []
    with fwAD.dual_level():
        h = fwAD.make_dual(x, torch.zeros_like(x))
        for block in blocks:
            z = block(h)  # the hook's input: this layer's output, its graph to the layer only
            primal, tangent = fwAD.unpack_dual(z)
            u = torch.randn_like(primal)  # DFAHookFunction.jvp: input + perturbations
            outs.append(primal)
            us.append(u)
            h = fwAD.make_dual(primal.detach(), tangent + u)
        y_dual = head(h)
        d = fwAD.unpack_dual(y_dual).tangent.detach()  # OutputHookFunction.jvp: the output's tangent
        y = fwAD.unpack_dual(y_dual).primal
    loss = F.cross_entropy(y, target)
    head_params = [head.weight, head.bias]
    e = torch.autograd.grad(loss, y, retain_graph=True)[0]
    grads = dict(zip(map(id, head_params), torch.autograd.grad(loss, head_params)))
    others = [p for p in model.parameters() if id(p) not in grads and p is not model.dfa.feedback]
    for z, B in zip(outs, Bs):
        for p, g in zip(others, torch.autograd.grad(z, others, (e @ B).reshape(z.shape), allow_unused=True)):
            if g is not None:
                grads[id(p)] = g
    # grad_feedback = feedbacks - mean(dir_der_at_output x perturbations)
    B_grads = [B - (d.T @ u.flatten(1)) / x.shape[0] for B, u in zip(Bs, us)]
    return grads, B_grads


def step(model, x, target, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), target).backward()
    return {id(p): p.grad for p in model.parameters() if p is not model.dfa.feedback}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", ["mlp", "mlp-fused", "mlp-linear", "cnn"])
def test_fdfa_equals_the_reference_over_steps(net, backend):
    """Three SGD steps from a random B (the reference starts at zero: no signal at step 1): every
    parameter's gradient, B's gradient and B itself as the reference computes them."""
    torch.manual_seed(3)
    dfa = dk.DFA(mode="fdfa", backend=backend)
    model = CNN(dfa) if net == "cnn" else MLP(dfa, kind=net.partition("-")[2] or "plain")
    x = torch.randn(7, 2, 8, 8) if net == "cnn" else torch.randn(7, 6)
    target = torch.randint(0, CLASSES, (7,))
    with torch.no_grad():
        model(x)  # makes B (zero), as the reference's first evaluation does
    assert torch.equal(dfa.feedback, torch.zeros_like(dfa.feedback))
    with torch.no_grad():
        dfa.feedback.normal_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(3):
        Bs = [B.clone() for B in dfa.feedback_matrices()]
        expected, B_grads = oracle(model, x, target, Bs, seed=k)
        got = step(model, x, target, seed=k)
        assert got.keys() == expected.keys()
        for key in got:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dfa.feedback.grad, torch.cat(B_grads, 1), atol=1e-5, rtol=1e-4)
        opt.step()
        torch.testing.assert_close(
            torch.cat(dfa.feedback_matrices(), 1), torch.cat([B - 0.1 * g for B, g in zip(Bs, B_grads)], 1)
        )
        assert fwAD._current_level == -1  # dfa(y) left the forward-mode level it entered


def test_fdfa_estimate_is_the_jacobian_on_average():
    """E[d u_l^T] = J_l = dy/dh_l: averaged over draws, -grad(B) at B = 0 approaches the last point's
    Jacobian (the head's weight here) and the first's (the head through tanh and the middle layer)."""
    torch.manual_seed(4)
    dfa = dk.DFA(mode="fdfa")
    model = MLP(dfa, sizes=(6, 16, 12, CLASSES))
    x, target = torch.randn(32, 6), torch.randint(0, CLASSES, (32,))
    draws, total = 300, 0
    for k in range(draws):
        step(model, x, target, seed=100 + k)
        total = total - dfa.feedback.grad
    mean = total / draws
    head, middle = model.layers[2].weight, model.layers[1]
    torch.testing.assert_close(mean[:, 16:], head.detach(), atol=0.05, rtol=0)
    with torch.no_grad():  # J_1 averaged over rows: W_head diag(tanh'(a_2)) W_2
        a2 = middle(torch.tanh(model.layers[0](x)))
        J1 = torch.einsum("ok,nk,ki->oi", head, 1 - torch.tanh(a2) ** 2, middle.weight) / x.shape[0]
    torch.testing.assert_close(mean[:, :16], J1, atol=0.05, rtol=0)
    assert (mean[:, 16:] - head).abs().max() < 0.5 * head.abs().max()  # the tolerance is not vacuous


def test_fdfa_shared_layout_adds_each_points_estimate_into_its_prefix():
    torch.manual_seed(5)
    dfa = dk.DFA.tinydfa(mode="fdfa")
    model = MLP(dfa, sizes=(6, 16, 12, CLASSES))
    x, target = torch.randn(5, 6), torch.randint(0, CLASSES, (5,))
    with torch.no_grad():
        model(x)
        dfa.feedback.normal_()
    B = dfa.feedback.detach().clone()
    Bs = [B[:, :16], B[:, :12]]
    expected, B_grads = oracle(model, x, target, Bs, seed=0)
    got = step(model, x, target, seed=0)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
    grad = torch.zeros_like(B)
    for Bl, g in zip(Bs, B_grads):
        grad[:, : Bl.shape[1]] += g - Bl  # the estimates add into the shared prefixes ...
    torch.testing.assert_close(dfa.feedback.grad, B + grad, atol=1e-5, rtol=1e-4)  # ... and B once


def test_fdfa_outside_training_and_after_a_failed_forward():
    """No perturbation (and no forward-mode level) under no_grad; a forward that raises before
    dfa(y) leaves its level with dfa.discard_points(); a caller's own level is used, not nested."""
    torch.manual_seed(6)
    dfa = dk.DFA(mode="fdfa")
    model = MLP(dfa)
    x = torch.randn(4, 6)
    with torch.no_grad():
        y1 = model(x)
        assert fwAD._current_level == -1
    dfa.point(torch.tanh(model.layers[0](x)))  # a forward that stops here
    assert fwAD._current_level == 0
    assert dfa.discard_points() == 1 and fwAD._current_level == -1
    with fwAD.dual_level():
        y2 = model(x)
        assert fwAD._current_level == 0 and dfa.feedback.shape == (CLASSES, 28)
    torch.testing.assert_close(y1, y2)
    F.cross_entropy(y2, torch.zeros(4, dtype=torch.long)).backward()
    assert dfa.feedback.grad is not None


def test_fdfa_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"mode 'fdfa' .*storage='virtual'"):
        dk.DFA(mode="fdfa", storage="virtual")
    dfa = dk.DFA(mode="fdfa")
    dfa.point(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="y carries no forward-mode tangent"):
        dfa(torch.randn(3, 2))  # y does not depend on the point
    assert fwAD._current_level == -1
    dfa = dk.DFA(mode="fdfa")
    dfa.point(torch.randn(2, 3, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"mode 'fdfa' materializes its learned B \[vocab, D\]"):
        dfa.linear_cross_entropy(torch.randn(2, 3, 4), nn.Linear(4, 7), torch.zeros(2, 3, dtype=torch.long))
    dfa.discard_points()
