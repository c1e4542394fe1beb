"""A full DFA training step under torch.compile (the trainer's compile option, ``dfa-kernels train
--compile``): the loss with the model's forward in one graph (AOTAutograd compiles its backward,
where the projection runs) and the optimizer step, for an MLP, the GCN and the Transformer LM in
every placement. A graph break in the loss fails (torch._dynamo.explain); the dfa_kernels ops must
be in the captured backward graph; a few compiled steps match eager ones.

The zoo models compile with a backend that records AOTAutograd's graphs and runs them with eager
kernels (aot_eager's path; the same dropout masks as eager, the sums in another order); the MLP
also runs through inductor (C++ code generation: tens of seconds on a CPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import dfa_kernels as dk
from dfa_kernels.zoo import tasks
from dfa_kernels.zoo.models import transformer as T
from dfa_kernels.zoo.trainer import Run, Shuffled, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PLACEMENTS = getattr(T, "PLACEMENTS", ("macro", "micro"))  # "linear" where the model has it
DFA_OPS = ("dfa_kernels.",)
# the projection e @ B: with B generated in the kernel (virtual storage), or written out first
# (feedback_matrix, then project_materialized: storage="auto" for a small B), or fused with the
# points' activation derivatives (project_points)
PROJECTIONS = {
    "dfa_kernels.project.default",
    "dfa_kernels.project_materialized.default",
    "dfa_kernels.project_points.default",
}


class Recorder:
    """A torch.compile backend: AOTAutograd's forward and backward graphs, kept, run as they are."""

    def __init__(self):
        self.graphs = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self._keep("forward"), bw_compiler=self._keep("backward"))

    def _keep(self, kind):
        def compiler(gm, example_inputs):
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def __call__(self, gm, example_inputs):
        return self.backend(gm, example_inputs)

    def ops(self, kind) -> set[str]:
        return {str(n.target) for gm in self.graphs[kind] for n in gm.graph.nodes if n.op == "call_function"}


def compiled_vs_eager(build, compile):
    """(eager Fit, compiled Fit, compiled run) of the same run. Fails on any graph break in the
    loss (the model's forward and everything the recipe's loss does around it). The optimizer's
    own step has two deliberate ones, in torch.optim (around its no_grad region, so AOTAutograd
    sees an inference graph): the update itself is compiled as one graph between them. Nothing
    is compiled twice (the trainer's eager priming forward fixes the DFA widths first; the
    scheduled learning rates are tensors)."""
    probe = build()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda batch: probe.loss(probe.model, batch))(next(probe.batches))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    eager = Trainer(build(), progress=False).fit()
    torch._dynamo.reset()
    run = build()
    with torch._dynamo.config.patch(error_on_recompile=True):  # one trace per step function
        fitted = Trainer(run, progress=False, compile=compile).fit()
    return eager, fitted, run


def assert_captured(recorder, fused: bool):
    """A projection op (and, for dfa.linear points, the grouped weight gradient) in the compiled
    backward graph: DFA's work runs in the backward; no dfa_kernels op in a forward graph; Adam's
    update compiled (its inference graph)."""
    backward = recorder.ops("backward")
    assert backward & PROJECTIONS, sorted(backward)
    assert fused == ("dfa_kernels.grouped_weight_grad.default" in backward), sorted(backward)
    assert not any(op.startswith(DFA_OPS) for op in recorder.ops("forward"))
    assert "aten.addcdiv.default" in recorder.ops("forward")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.dfa = dk.DFA(seed=1)

    def forward(self, x):
        x = self.dfa.point(torch.relu(self.l1(x)))
        x = self.dfa.linear(x, self.l2, "gelu")
        return self.dfa(self.head(x))


def mlp_run():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Run(
        model=model,
        optimizer=opt,
        batches=Shuffled(64, 16, seed=0),
        loss=lambda model, rows: F.cross_entropy(model(X[rows]), Y[rows]),
        evaluate=lambda model, split: {"loss": F.cross_entropy(model(X), Y).item()},
        select="loss",
        higher_is_better=False,
        epochs=2,
        steps_per_epoch=3,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    )


def test_mlp_step_compiled_with_inductor_matches_eager():
    """Forward, backward (project + grouped weight gradient in the compiled backward) and Adam with
    a scheduled (tensor) learning rate, through inductor; no graph break, no recompile per step."""
    eager, compiled, run = compiled_vs_eager(mlp_run, True)
    assert [h["train_loss"] for h in compiled.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], rel=1e-5
    )
    want = Trainer(mlp_run(), progress=False)
    want.fit()
    for p, q in zip(run.model.parameters(), want.run.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert isinstance(run.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert run.optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-2 / 7)  # the scheduler's value


def test_mlp_step_graphs_hold_the_projection():
    recorder = Recorder()
    eager, compiled, _ = compiled_vs_eager(mlp_run, recorder)
    assert [h["train_loss"] for h in compiled.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], rel=1e-6
    )
    assert_captured(recorder, fused=True)


def test_gcn_step_compiled():
    """The zoo's GCN (PyG GCNConv, dropout drawn over the features' non-zeros, a boolean node mask
    in the loss): data-dependent shapes traced, no graph break."""
    pytest.importorskip("torch_geometric")
    config = tasks.TrainConfig("gcn-cora", epochs=3, progress=False)
    recorder = Recorder()
    eager, compiled, _ = compiled_vs_eager(lambda: tasks.get("gcn-cora").build(config), recorder)
    assert [h["train_loss"] for h in compiled.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], rel=1e-6
    )
    assert compiled.final["test_acc"] == pytest.approx(eager.final["test_acc"], abs=2e-3)  # 2 nodes of 1000
    assert_captured(recorder, fused=False)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_transformer_step_compiled(placement):
    """The zoo's Transformer LM in each placement (micro: fused dfa.linear FFN points), Adam with
    two parameter groups, gradient clipping and the warmup + cosine schedule of the recipe."""
    from dfa_kernels.zoo.recipes import transformer as R

    def build():
        run = R.build_lm(
            "lm-pydoc",
            tasks.TrainConfig("lm-pydoc", placement=placement, epochs=2),
            layers=2,
            d_model=32,
            heads=2,
            d_ff=64,
            context=16,
        )
        run.steps_per_epoch = 3
        run.evaluate = lambda model, split: {"loss": 0.0}
        return run

    recorder = Recorder()
    eager, compiled, run = compiled_vs_eager(build, recorder)
    assert [h["train_loss"] for h in compiled.history] == pytest.approx(
        [h["train_loss"] for h in eager.history], rel=1e-6
    )
    fused = run.model.fused and placement != "macro"  # dfa.linear points: project_points + grouped GEMM
    assert_captured(recorder, fused)


def test_bench_step_times_the_compiled_step(monkeypatch):
    """bench_step's compile option (here one compiled variant, tiny MLP: the C++ compile is slow)."""
    from dfa_kernels.bench import step

    monkeypatch.setattr(step, "COMPILED", {"dfa_compiled": "dfa"})
    result = step.run_workload("mlp", "cpu", "tiny", 1, progress=False, compile=True)
    assert not result["failed_variants"] and set(result["compiled_over_eager"]) == {"dfa_compiled"}
    assert result["ms_per_step"]["dfa_compiled"] > 0 and "dfa_compiled" not in result["flops"]["gflop_per_step"]
