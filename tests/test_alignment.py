"""dk.alignment: DFA's signal and updates against backprop's, measured without changing training."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk


class Net(nn.Module):
    """Two hidden layers with dropout and batch norm (state a measurement must not disturb)."""

    def __init__(self, dfa):
        super().__init__()
        self.l1, self.bn, self.l2, self.head = (
            nn.Linear(12, 32),
            nn.BatchNorm1d(32),
            nn.Linear(32, 24),
            nn.Linear(24, 5),
        )
        self.dfa = dfa

    def forward(self, x):
        h = self.dfa.point(F.dropout(torch.relu(self.bn(self.l1(x))), 0.3, self.training))
        h = self.dfa.point(torch.tanh(self.l2(h)))
        return self.dfa(self.head(h))


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g)


def test_bp_control_gives_cosine_one(batch):
    """Backprop against itself: every signal and update cosine is 1, dropout included (both
    passes draw the same masks)."""
    model = Net(dk.DFA(mode="dfa"))
    res = dk.alignment(model, loss_fn, batch, mode="bp")
    points = res["dfa_modules"]["dfa"]["points"]
    assert len(points) == 2
    for p in points:
        assert p["signal"]["cos_mean"] == pytest.approx(1.0, abs=1e-6)
        assert p["signal"]["cos_std"] == pytest.approx(0.0, abs=1e-6)
        assert p["signal"]["cos_flat"] == pytest.approx(1.0, abs=1e-6)
        assert p["update"]["cos"] == pytest.approx(1.0, abs=1e-6)
        assert p["signal"]["angle_deg"] == pytest.approx(0.0, abs=0.1)
    assert res["network"]["update_cos"] == pytest.approx(1.0, abs=1e-6)


def test_trained_parameters_per_point(batch):
    """Each point owns the layers between it and the previous point; the head is left out."""
    model = Net(dk.DFA(mode="dfa"))
    res = dk.alignment(model, loss_fn, batch)
    first, second = res["dfa_modules"]["dfa"]["points"]
    assert set(first["trains"]) == {"l1.weight", "l1.bias", "bn.weight", "bn.bias"}
    assert set(second["trains"]) == {"l2.weight", "l2.bias"}
    assert res["network"]["parameters"] == 6 and res["deepest"]["point"] == 0


def test_closed_form_one_hidden_linear_layer():
    """h = W1 x (the point), y = W2 h, L = mean squared error: DFA's signal at h is e @ B1 (scaled),
    backprop's e @ W2; the updates are their products with x. Computed here by hand."""
    torch.manual_seed(0)
    N, d_in, d_h, d_out = 40, 6, 9, 3
    W1, W2 = nn.Linear(d_in, d_h, bias=False), nn.Linear(d_h, d_out, bias=False)
    dfa = dk.DFA(mode="dfa", seed=3)
    model = nn.ModuleDict(dict(W1=W1, W2=W2, dfa=dfa))
    x, t = torch.randn(N, d_in), torch.randn(N, d_out)

    def loss(m, _):
        return F.mse_loss(m["dfa"](m["W2"](m["dfa"].point(m["W1"](x)))), t)

    res = dk.alignment(model, loss, None)
    with torch.no_grad():
        e = (W2(W1(x)) - t) * 2 / (N * d_out)  # dL/dy of the mean squared error
        B1 = dfa.feedback_matrices()[0]  # [d_out, d_h], scale applied
        dfa_h, bp_h = e @ B1, e @ W2.weight  # the two signals at h
        per_row = F.cosine_similarity(dfa_h.double(), bp_h.double(), dim=1)
        dfa_W1, bp_W1 = dfa_h.T @ x, bp_h.T @ x  # dL/dW1 = delta^T x
        flat = F.cosine_similarity(dfa_W1.flatten().double(), bp_W1.flatten().double(), dim=0)
    point = res["dfa_modules"]["dfa"]["points"][0]
    assert point["trains"] == ["W1.weight"]
    assert point["signal"]["cos_mean"] == pytest.approx(float(per_row.mean()), abs=1e-6)
    assert point["signal"]["cos_std"] == pytest.approx(float(per_row.std()), abs=1e-6)
    assert point["signal"]["samples"] == N
    assert point["update"]["cos"] == pytest.approx(float(flat), abs=1e-6)
    assert point["update"]["parameters"]["W1.weight"] == pytest.approx(float(flat), abs=1e-6)
    assert point["signal"]["angle_deg"] == pytest.approx(math.degrees(math.acos(float(per_row.mean()))), abs=1e-4)


def test_measurement_changes_nothing(batch):
    """Parameters, their gradients, optimizer state, batch-norm statistics, RNG states, modes and
    train/eval flags are the same after a measurement as before it."""
    torch.manual_seed(0)
    model = Net(dk.DFA(mode="dfa"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    loss_fn(model, batch).backward()  # leave gradients in place: they must survive
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt_state = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    model.l2.eval()  # a mixed train/eval state is restored as it was
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    dk.alignment(model, loss_fn, batch)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    for k, v in opt.state_dict()["state"].items():
        assert all(torch.equal(opt_state[k][kk], vv) for kk, vv in v.items())
    assert torch.equal(rng[0], torch.get_rng_state()) and (rng[1] == np.random.get_state()[1]).all()
    assert rng[2] == random.getstate()
    assert model.dfa.mode == "dfa" and model.training and not model.l2.training and model.bn.training


def test_eval_mode_and_fused_points(batch):
    """Fused points (dfa.linear, dfa.point with an activation) are measured on their pre-activation."""

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.head, self.dfa = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5), dk.DFA()

        def forward(self, x):
            h = self.dfa.linear(x, self.l1, "gelu")
            h = self.dfa.point(self.l2(h), activation="relu")
            return self.dfa(self.head(h))

    res = dk.alignment(Fused(), loss_fn, batch, eval_mode=True, mode="bp")
    assert res["measured_in"].startswith("eval mode")
    first, second = res["dfa_modules"]["dfa"]["points"]
    assert first["activation"] == "gelu" and set(first["trains"]) == {"l1.weight", "l1.bias"}
    assert second["signal"]["cos_mean"] == pytest.approx(1.0, abs=1e-6)
    dfa = dk.alignment(Fused(), loss_fn, batch)
    assert -1 <= dfa["dfa_modules"]["dfa"]["points"][0]["signal"]["cos_mean"] <= 1


def _cos_rows(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("mode", ["fa", "usf", "brsf", "frsf"])
def test_layerwise_closed_form_and_training_state_untouched(mode, batch):
    """A layer-wise method on x -> l1 -> ReLU -> l2 -> tanh -> l3: the signal at l2's output is
    (g3 @ B3) * tanh'(a2) against backprop's (g3 @ W3) * tanh'(a2), g3 = dL/dy exact; the output
    layer's signal and update are exact (cosine 1). Computed here by hand; brsf's draw counter and
    the parameters' grads are as before the measurement."""
    torch.manual_seed(0)
    x, t = batch
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 9), nn.Tanh(), nn.Linear(9, 5))
    converted = dk.convert(model, mode=mode)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    loss(converted, batch).backward()  # one training step's grads and (brsf) one draw
    draws, grads = converted.model[4].draws, [p.grad.clone() for p in converted.parameters()]
    B3 = converted.model[4].feedback_matrix()  # brsf: the last draw's; the measurement draws the next one
    res = dk.alignment(converted, loss, batch, mode=mode)
    assert [e["name"] for e in res["layers"]] == ["model.0", "model.2", "model.4"]
    assert res["deepest"]["layer"] == "model.0" and res["network"]["parameters"] == 4
    out = res["layers"][2]
    assert out["signal"]["cos_mean"] == pytest.approx(1.0) and out["update"]["cos"] == pytest.approx(1.0)
    W1, W2, W3 = model[0].weight, model[2].weight, model[4].weight
    with torch.no_grad():
        h1 = torch.relu(x @ W1.T + model[0].bias)
        a2 = h1 @ W2.T + model[2].bias
        y = torch.tanh(a2) @ W3.T + model[4].bias
        g3 = (torch.softmax(y, 1) - F.one_hot(t, 5)) / len(x)
        bp = (g3 @ W3) * (1 - torch.tanh(a2) ** 2)
    if mode != "brsf":  # brsf's measurement pass draws a matrix of its own
        ours = (g3 @ B3) * (1 - torch.tanh(a2) ** 2)
        assert res["layers"][1]["signal"]["cos_mean"] == pytest.approx(float(_cos_rows(ours, bp).mean()), abs=1e-6)
        update = torch.cat([(ours.T @ h1).flatten(), ours.sum(0)])
        want = F.cosine_similarity(update.double(), torch.cat([(bp.T @ h1).flatten(), bp.sum(0)]).double(), dim=0)
        assert res["layers"][1]["update"]["cos"] == pytest.approx(float(want), abs=1e-6)
    assert res["layers"][1]["signal"]["cos_mean"] < 0.999  # not backprop
    assert converted.model[4].draws == draws and converted.dfa.mode == mode
    for p, g in zip(converted.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no dk.DFA module"):
        dk.alignment(nn.Linear(2, 2), lambda m, b: m(b).sum(), torch.randn(3, 2))
    with pytest.raises(ValueError, match="mode must be"):
        dk.alignment(Net(dk.DFA()), loss_fn, None, mode="shallow")
    with pytest.raises(ValueError, match="no feedback layers"):
        dk.alignment(Net(dk.DFA()), loss_fn, None, mode="fa")


def test_align_command_on_a_zoo_task(tmp_path):
    """`dfa-kernels align`: alignment.json with measurements along training, and the plot."""
    pytest.importorskip("torch_geometric")
    import json

    from dfa_kernels import cli

    cli.main(["align", "gcn-cora", "--epochs", "6", "--every", "3", "--out", str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "gcn-cora" / "alignment.json").read_text())
    assert [m["step"] for m in report["measurements"]] == [3, 6]
    assert report["final"]["deepest"]["signal_cos_mean"] is not None
    assert report["provenance"]["git_sha"] is not None and "align gcn-cora" in report["provenance"]["command"]
    assert (tmp_path / "gcn-cora" / "alignment.png").stat().st_size > 5000
