"""The layer-wise methods against biotorch itself (jsalbert/biotorch 0.0.16, its default Xavier preset).

biotorch is pinned in requirements/oracles.txt, which the README's test command installs with
``--no-deps`` (its layers need only torch; its own pins would downgrade torch), so CI runs this
file; elsewhere it skips with that command as the reason. Each case hands biotorch the matrices ours
uses (``feedback_matrix()``): fa's B as ``weight_backward``; for frsf fa's B too (biotorch keeps |B|
and multiplies by sign(W) itself); for brsf this step's |R_t| through biotorch's own redraw
(``xavier_uniform_``, patched for the step); usf gets nothing: biotorch computes its σ·sign(W) from
its own scaling factor.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk
from dfa_kernels import layerwise

biotorch = pytest.importorskip(
    "biotorch", reason="biotorch not installed: pip install --no-deps -r requirements/oracles.txt"
)
from biotorch.layers import fa_constructor  # noqa: E402
from biotorch.module.biomodule import BioModule  # noqa: E402

MODES = ["fa", "usf", "brsf", "frsf"]
OPTIONS = {"init": "xavier", "constrain_weights": False, "gradient_clip": False}


def fa_matrix(layer):
    """Our layer's fa matrix (frsf's |B| is its magnitude)."""
    return layerwise.Rule(
        "fa", layer.seed, layer.distribution, layer.density, layer.init, layer.storage, layer.backend
    ).matrix(layer.weight)


def hand_matrices(ours, theirs, mode, monkeypatch):
    """Give biotorch's layer `theirs` the matrix of our layer `ours` (after our forward)."""
    if mode in ("fa", "frsf"):
        B = fa_matrix(ours)
        theirs.weight_backward.data = B.abs() if mode == "frsf" else B
    elif mode == "brsf":
        R = ours.feedback_matrix().abs()
        monkeypatch.setattr(torch.nn.init, "xavier_uniform_", lambda t, gain=1.0: t.copy_(R))


def run(layer, x, g):
    x = x.clone().requires_grad_()
    layer(x).backward(g)
    return [x.grad] + [p.grad for p in (layer.weight, layer.bias) if p is not None]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_gradients_equal_biotorchs(mode, kind, monkeypatch):
    torch.manual_seed(0)
    if kind == "linear":
        ours = dk.FeedbackLinear(12, 7, mode=mode, seed=3)
        theirs = fa_constructor.Linear(12, 7, True, {"type": mode, "options": dict(OPTIONS)})
        x, g = torch.randn(5, 12), torch.randn(5, 7)
    else:
        ours = dk.FeedbackConv2d(4, 6, 3, stride=2, padding=1, groups=2, mode=mode, seed=3)
        theirs = fa_constructor.Conv2d(4, 6, 3, 2, 1, 1, 2, True, "zeros", {"type": mode, "options": dict(OPTIONS)})
        x, g = torch.randn(2, 4, 7, 7), torch.randn(2, 6, 4, 4)
    theirs.weight.data.copy_(ours.weight.detach())
    theirs.bias.data.copy_(ours.bias.detach())
    got = run(ours, x, g)
    hand_matrices(ours, theirs, mode, monkeypatch)
    expected = run(theirs, x, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if mode != "brsf":  # biotorch records the matrix it used (brsf's too, but drawn by the patch)
        torch.testing.assert_close(
            ours.feedback_matrix(),
            theirs.weight_backward * (torch.sign(theirs.weight.detach()) if mode == "frsf" else 1),
        )


@pytest.mark.parametrize("mode", MODES)
def test_converted_model_equals_biotorchs_biomodule(mode, monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 10),
        nn.Tanh(),
        nn.Linear(10, 5),
    )
    ours = dk.convert(model, mode=mode)
    theirs = BioModule(copy.deepcopy(model), mode=mode)
    x, target = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    F.cross_entropy(ours(x), target).backward()
    draws = {}
    for name, layer in ours.model.named_modules():
        if name in ours.layers:
            their = theirs.module.get_submodule(name)
            if mode == "brsf":
                draws[id(their)] = layer.feedback_matrix().abs()
            else:
                hand_matrices(layer, their, mode, monkeypatch)
    if mode == "brsf":  # one draw per layer, in forward order
        order = iter(draws[id(m)] for m in theirs.module.modules() if id(m) in draws)
        monkeypatch.setattr(torch.nn.init, "xavier_uniform_", lambda t, gain=1.0: t.copy_(next(order)))
    F.cross_entropy(theirs(x), target).backward()
    their_params = [q for n, q in theirs.module.named_parameters() if "backward" not in n]
    assert len(their_params) == len(list(ours.model.parameters()))
    for (name, p), q in zip(ours.model.named_parameters(), their_params):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
