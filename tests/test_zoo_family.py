"""The zoo trains every method of the random-feedback family (issue 22): the cnn-digits task, the
layer conversion, drtp's class targets, dkp's learned matrices in the optimizer, the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk
from dfa_kernels import cli, methods
from dfa_kernels.layerwise import FeedbackConv2d, FeedbackLinear
from dfa_kernels.zoo import family, tasks
from dfa_kernels.zoo.recipes import image
from dfa_kernels.zoo.trainer import FullBatch, Run, Stopped
from dfa_kernels.zoo.training import train


def config(mode, **kw):
    return tasks.TrainConfig("cnn-digits", mode=mode, progress=False, **kw)


def test_digits_split_is_stratified_disjoint_and_fixed():
    data = image.load_data()
    sizes = {k: len(y) for k, (_, y) in data.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    for _, y in data.values():  # every class in every split, in the dataset's proportions
        share = torch.bincount(y, minlength=10).float() / len(y)
        assert (share - 0.1).abs().max() < 0.015
    rows = {k: {tuple(x.flatten().tolist()) for x in xs} for k, (xs, _) in data.items()}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    image.load_data.cache_clear()
    again = image.load_data()
    assert all(torch.equal(again[k][1], data[k][1]) for k in data)  # split seed fixed, not the run's
    assert abs(float(data["train"][0].mean())) < 1e-5 and abs(float(data["train"][0].std()) - 1) < 1e-3


@pytest.mark.parametrize("mode", methods.MODES)
def test_cnn_digits_trains_in_every_mode(mode):
    result = train(tasks.get("cnn-digits"), config(mode, epochs=2))
    assert result.final["test_acc"] > 0.3, result.final  # well above chance (0.1) after 2 epochs
    converted = [m for m in result.model.modules() if isinstance(m, (FeedbackLinear, FeedbackConv2d))]
    assert len(converted) == (3 if mode in methods.LAYERWISE else 0)


def grads(run, batch):
    run.model.zero_grad(set_to_none=True)
    run.loss(run.model, batch).backward()
    return {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


def test_layerwise_mode_changes_input_gradients_only():
    """fa: the output layer's weight gradient g^T x is exact (its input is the exact activation), the
    first convolution's is not (it receives g @ B instead of g @ W)."""
    task, batch = tasks.get("cnn-digits"), torch.arange(64)
    fa, bp = task.build(config("fa")), task.build(config("bp"))
    bp.model.load_state_dict(fa.model.state_dict())
    g_fa, g_bp = grads(fa, batch), grads(bp, batch)
    torch.testing.assert_close(g_fa["fc.weight"], g_bp["fc.weight"])
    cos = F.cosine_similarity(g_fa["conv1.weight"].flatten(), g_bp["conv1.weight"].flatten(), dim=0)
    assert cos < 0.99
    # the oracle: conv2's input gradient is conv2d_input with fa's matrix in place of W
    layer = fa.model.conv2
    x = torch.randn(3, 16, 8, 8, requires_grad=True)
    g = torch.randn(3, 32, 4, 4)
    layer(x).backward(g)
    expected = torch.nn.grad.conv2d_input(x.shape, layer.feedback_matrix(), g, stride=2, padding=1)
    torch.testing.assert_close(x.grad, expected)


def test_drtp_projects_the_batch_targets_not_the_error():
    """drtp's hidden-layer gradients depend on the targets, not on the output layer (no error)."""
    task, batch = tasks.get("cnn-digits"), torch.arange(32)
    run = task.build(config("drtp"))
    before = grads(run, batch)
    with torch.no_grad():
        run.model.fc.weight.mul_(-3.0)
    after = grads(run, batch)
    torch.testing.assert_close(before["conv1.weight"], after["conv1.weight"])
    assert not torch.allclose(before["fc.weight"], after["fc.weight"])
    # the oracle: the last point's gradient is onehot(t) @ B, B the point's effective matrix
    model = run.model
    y = image.load_data()["train"][1][batch]
    x = image.load_data()["train"][0][batch]
    h = F.relu(model.conv2(F.relu(model.conv1(x)))).detach().requires_grad_()
    B = model.dfa.feedback_matrices()[-1]
    expected = F.one_hot(y, 10).float() @ B
    model.dfa.point(torch.zeros(32, 16, 8, 8))
    point = model.dfa.point(h)
    model.dfa.targets(y)
    F.cross_entropy(model.dfa(model.fc(point.flatten(1))), y).backward()
    torch.testing.assert_close(h.grad.flatten(1), expected)


def test_graph_drtp_sends_targets_of_training_nodes_only():
    pytest.importorskip("torch_geometric")
    run = tasks.get("gcn-cora").build(tasks.TrainConfig("gcn-cora", mode="drtp", progress=False))
    t = run.targets(run.batches.batch)
    assert (t[run.batches.batch.train_mask] >= 0).all() and (t[~run.batches.batch.train_mask] == -1).all()


def test_gcn_layerwise_converts_pyg_linears_and_changes_only_input_gradients():
    """gcn-cora in fa: both GCNConv weight layers (PyG Linear) become feedback layers; the first
    layer's weight gradient differs from BP's (its output gradient came through B, not W^T), the
    output layer's (no feedback above it) equals BP's."""
    pytest.importorskip("torch_geometric")
    grads = {}
    for mode in ("bp", "fa"):
        torch.manual_seed(0)
        run = tasks.get("gcn-cora").build(tasks.TrainConfig("gcn-cora", mode=mode, progress=False))
        run.model.eval()  # no dropout: the two runs compute the same forward
        run.loss(run.model, run.batches.batch).backward()
        grads[mode] = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    assert run.hyper_parameters["layers_converted"] == 2
    torch.testing.assert_close(grads["fa"]["conv2.lin.weight"], grads["bp"]["conv2.lin.weight"])
    assert not torch.allclose(grads["fa"]["conv1.lin.weight"], grads["bp"]["conv1.lin.weight"])


def test_dkp_learned_matrix_is_in_the_optimizer_and_learns():
    run = tasks.get("cnn-digits").build(config("dkp"))
    B = run.model.dfa.feedback
    assert isinstance(B, nn.Parameter)
    assert any(p is B for g in run.optimizer.param_groups for p in g["params"])
    start = B.detach().clone()
    batch = next(run.batches)
    run.optimizer.zero_grad()
    run.loss(run.model, batch).backward()
    run.optimizer.step()
    assert not torch.equal(start, B.detach())


@pytest.mark.parametrize("mode", ["sdfa", "brsf"])
def test_alignment_measures_the_methods_own_signal(mode, tmp_path):
    """A direct method at its points, a layer-wise one at its feedback layers (and its plot)."""
    from dfa_kernels.align import plot_alignment

    result = train(tasks.get("cnn-digits"), config(mode, epochs=1, alignment_every=20))
    last = result.alignment[-1]
    assert last["compared"] == f"mode {mode!r} against backprop"
    assert -1 <= last["network"]["update_cos"] <= 1
    assert ("layers" in last) == (mode == "brsf")
    assert plot_alignment(result.alignment, tmp_path / "a.png").stat().st_size > 5000


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out, self.dfa = nn.Linear(4, 4), nn.Linear(4, 1), dk.DFA()

    def forward(self, x):
        return self.dfa(self.out(self.dfa.point(torch.relu(self.hidden(x)))))


def small_run(model, targets=None):
    x = torch.randn(8, 4)
    return Run(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        batches=FullBatch(x),
        loss=lambda m, b: m(b).square().mean(),
        evaluate=lambda m, s: {"loss": 0.0},
        select="loss",
        higher_is_better=False,
        epochs=1,
        steps_per_epoch=1,
        targets=targets,
    )


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="no class targets"):
        family.prepare(small_run(Regression()), "drtp")
    hybrid = Regression()
    hybrid.extra = nn.MultiheadAttention(4, 1)
    with pytest.raises(ValueError, match=r"\['extra', 'extra.out_proj'\].*hybrid"):
        family.prepare(small_run(hybrid), "fa")
    with pytest.raises(ValueError, match="does not train mode 'fa'.*attention vectors.*hybrid"):
        tasks.get("gat-cora").check_mode("fa")
    with pytest.raises(ValueError, match="does not train mode 'drtp'.*no class targets"):
        tasks.get("nerf").check_mode("drtp")
    with pytest.raises(ValueError, match="mode must be one of"):
        tasks.get("cnn-digits").check_mode("backprop")


def test_layerwise_conversion_refuses_nested_dfa_modules():
    """With several DFA modules each converts its parent's layers; a parent holding a second DFA
    module deeper down would leave its layers' mode ambiguous."""
    inner = nn.Module()
    inner.dfa, inner.fc = dk.DFA(), nn.Linear(4, 4)
    outer = Regression()
    outer.dfa, outer.inner = dk.DFA(), inner
    with pytest.raises(ValueError, match="holds another one inside a submodule"):
        family.prepare(small_run(outer), "fa")


def test_cli_refuses_an_unsupported_mode_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["compare", "gae-cora", "--modes", "bp", "drtp"])
    assert exit.value.code == 2
    assert "does not train mode 'drtp': link prediction has no class targets" in capsys.readouterr().err


def test_tuning_variants_cover_the_tasks_modes():
    from dfa_kernels.zoo import tuning

    assert [c.mode for c in tuning.variants(tasks.get("cnn-digits"))] == list(tasks.get("cnn-digits").modes)
    assert set(tasks.get("cnn-digits").modes) == set(methods.MODES)
    assert set(tasks.get("gcn-cora").modes) == set(methods.MODES)  # PyG's Linear converts
    assert "fa" not in tasks.get("gat-cora").modes and "drtp" in tasks.get("gat-cora").modes
    assert tasks.tuned_as("sdfa") == "dfa" and tasks.tuned_as("bp") == "bp"


@pytest.mark.parametrize("mode", ["dkp", "brsf", "drtp"])
def test_stop_and_resume_continues_a_family_run_exactly(mode, tmp_path):
    """A learned B (dkp: a parameter and an optimizer group), a redraw counter (brsf) and the targets
    (drtp) survive --stop-after / --resume: the same final weights as the uninterrupted run."""
    from dfa_kernels.zoo import checkpoint

    task = tasks.get("cnn-digits")
    full = train(task, config(mode, epochs=2))
    folder = tmp_path / "run"
    with pytest.raises(Stopped):
        train(task, config(mode, epochs=2), checkpoints=checkpoint.Checkpoints(folder / "c.pt", stop_after=40))
    resumed = train(
        task, config(mode, epochs=2), checkpoints=checkpoint.Checkpoints(folder / "c.pt", resume=folder / "c.pt")
    )
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert resumed.final["test_acc"] == full.final["test_acc"]


@pytest.mark.parametrize("mode", [m for m in methods.MODES if m not in tasks.BASE_MODES + ("drtp",)])
def test_lm_trains_the_family(mode):
    """The LM recipe trains every family method but DRTP: layer-wise ones convert all the blocks'
    linears and the head (embeddings and LayerNorms keep their exact gradients), direct ones keep
    their points; either learns well below the uniform byte loss in one short epoch."""
    task = tasks.get("lm-pydoc")
    result = train(task, tasks.TrainConfig("lm-pydoc", mode=mode, epochs=1, progress=False))
    converted = [m for m in result.model.modules() if isinstance(m, FeedbackLinear)]
    layers = len(result.model.blocks)
    assert len(converted) == (4 * layers + 1 if mode in methods.LAYERWISE else 0)
    assert result.final["test_loss"] < 0.8 * torch.log(torch.tensor(256.0)).item(), result.final
    assert result.config["placement"] == "macro"


def test_lm_refuses_drtp_and_unknown_presets_in_one_line(capsys):
    with pytest.raises(ValueError, match="does not train mode 'drtp'.*vocabulary-wide"):
        tasks.get("lm-shakespeare").check_mode("drtp")
    assert tuple(tasks.get("lm-shakespeare").presets) == ("cpu", "cpu-tied", "cpu-paper", "full")
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "lm-pydoc", "--preset", "cpu-tied"])
    assert exit.value.code == 2
    assert "preset must be one of 'cpu', 'full' for task 'lm-pydoc'; got 'cpu-tied'" in capsys.readouterr().err


def test_dkp_matrices_follow_the_recipes_schedule():
    """The learned matrices' optimizer group, added after the recipe built its LambdaLR, is scheduled
    like the first group (the LM's warmup and cosine)."""
    run = tasks.get("lm-pydoc").build(tasks.TrainConfig("lm-pydoc", mode="dkp", progress=False))
    first, learned = run.optimizer.param_groups[0], run.optimizer.param_groups[-1]
    assert learned["params"] == [run.model.dfa.feedback] and learned["weight_decay"] == 1e-6
    for _ in range(30):
        assert learned["lr"] == pytest.approx(first["lr"], rel=1e-12)
        run.optimizer.step()
        run.scheduler.step()
    assert first["lr"] != first["initial_lr"]
