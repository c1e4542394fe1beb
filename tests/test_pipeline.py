"""Pipeline-parallel training (dfa_kernels.pipeline) on CPU processes (gloo), against one process.

A pipelined run equals the single-process run accumulating the same microbatches (loss / M):
parameters equal to fp32 tolerance after several steps, for S = 2 and S = 4 stages, an MLP (a
fused-activation point and a fused dfa.linear point) and the zoo's TransformerLM (macro, micro,
linear placements; error after the final LN or after the head; Adam with a global gradient clip);
BP through torch.distributed.pipelining's GPipe and 1F1B likewise. Every stage's B (built from its
own columns) is bit-identical to the single process's; DFA sends no activation gradient, and e
once per microbatch to every other stage. Bad configurations are refused by name.
"""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from child_process import child_env
from distributed_utils import gather_all, spawn
from torch import nn

import dfa_kernels as dk
from dfa_kernels import pipeline as pl
from dfa_kernels.pipeline import simulate
from dfa_kernels.pipeline.train import PipelineTrainer
from dfa_kernels.zoo.models.recsys import AFN, DCN, AutoInt, DeepFM
from dfa_kernels.zoo.models.transformer import TransformerLM
from dfa_kernels.zoo.trainer import Run, Sampled, Shuffled, Stopped

STEPS = 3


class LinearBlock(nn.Module):
    """A block whose point is a fused dfa.linear (the layer's weight gradient inside the DFA op)."""

    def __init__(self, dfa, d_in, d_out):
        super().__init__()
        self.layer, self.dfa = nn.Linear(d_in, d_out), dfa

    def forward(self, x):
        return self.dfa.linear(x, self.layer, "tanh")


def mlp(mode, depth):
    torch.manual_seed(0)
    dfa = dk.DFA(mode=mode, seed=3)
    hidden = [nn.Linear(12 if i == 0 else 16, 16) for i in range(depth - 1)]
    head = nn.Linear(16, 5)
    blocks = pl.sequential_parts(dfa, hidden, head, activation="relu").blocks + [LinearBlock(dfa, 16, 16)]
    parts = pl.Parts(dfa, blocks, suffix=head)
    model = nn.ModuleList([*parts.blocks, parts.suffix, dfa])

    def reference_loss(x, t):
        h = x
        for block in parts.blocks:
            h = block(h)
        return F.cross_entropy(dfa(parts.suffix(h)), t)

    return parts, model, reference_loss


def lm(mode, layers, placement="macro", error_at="hidden"):
    torch.manual_seed(0)
    model = TransformerLM(
        17, context=8, layers=layers, d_model=16, heads=2, mode=mode, placement=placement, error_at=error_at, seed=5
    )
    return model, model, lambda x, t: F.cross_entropy(model(x).float().flatten(0, 1), t.flatten())


RECSYS_SIZES = {
    AutoInt: dict(layers=2, heads=2, d_att=4),
    AFN: dict(lnn=6, hidden=(8, 8)),
    DeepFM: dict(hidden=(8, 8, 8)),
    DCN: dict(cross_layers=3, hidden=(8, 8)),
}


def recsys(model_cls, mode):
    """A tiny recommender model (3 one-valued fields): two inputs (idx, bag), one logit."""
    torch.manual_seed(0)
    model = model_cls(20, 3, embed_dim=4, mode=mode, seed=5, **RECSYS_SIZES[model_cls])
    return model, model, lambda x, t: pl.parts.click_loss(model(*x), t)


def split(x, count):
    """Microbatches of a tensor, or of a tuple of tensors (a model's several inputs)."""
    return list(zip(*(t.tensor_split(count) for t in x))) if isinstance(x, tuple) else x.tensor_split(count)


def first_rows(x, n=2):
    return tuple(t[:n] for t in x) if isinstance(x, tuple) else x[:n]


def batches(kind, count, uneven=False):
    g = torch.Generator().manual_seed(1)
    if kind == "recsys":  # uneven: the middle batch is an epoch's last, smaller one (unequal microbatches)
        rows = [11 if uneven and i == count // 2 else 12 for i in range(count)]
        return [
            (
                (torch.randint(0, 20, (n, 3), generator=g), torch.zeros(n, 0)),
                torch.randint(0, 2, (n,), generator=g).float(),
            )
            for n in rows
        ]
    if kind == "mlp":
        return [(torch.randn(12, 12, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(count)]
    return [
        (torch.randint(0, 17, (4, 8), generator=g), torch.randint(0, 17, (4, 8), generator=g)) for _ in range(count)
    ]


def reference_step(ref, ref_opt, ref_loss, x, t, microbatches, clip=False):
    """The single process's step: the batch's `microbatches` accumulated (each loss weighted by
    its share of the rows: 1 / count when they split evenly), an optional global clip at 1.0, then
    the optimizer; returns the batch's loss."""
    ref_opt.zero_grad(set_to_none=True)
    total = 0.0
    for xm, tm in zip(split(x, microbatches), t.tensor_split(microbatches)):
        part = ref_loss(xm, tm) * (tm.shape[0] / t.shape[0])
        part.backward()
        total += part.item()
    if clip:
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    return total


def run_case(world, build, kind, schedule, M, adam):
    mode = "bp" if schedule != "dfa" else "dfa"
    parts, model, _ = build(mode)
    _, ref, ref_loss = build(mode)
    data = batches(kind, STEPS, uneven=schedule == "dfa")  # torch's stages take equal microbatches only

    def optimizer(m):
        return torch.optim.Adam(m.parameters(), lr=1e-2) if adam else torch.optim.SGD(m.parameters(), lr=0.1)

    opt, ref_opt = optimizer(model), optimizer(ref)
    pipe = pl.Pipeline(parts, world.size, M, first_rows(data[0][0]), schedule=schedule)
    first_step = None
    for x, t in data:
        opt.zero_grad(set_to_none=True)
        loss = pipe.step(x, t)
        first_step = first_step or copy.copy(pipe.stats)
        if adam:
            pipe.clip_grad_norm_(1.0)
        opt.step()
        ref_total = reference_step(ref, ref_opt, ref_loss, x, t, M, clip=adam)
        assert loss.item() == pytest.approx(ref_total, rel=1e-5)
    pipe.synchronize()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-6, msg=lambda m, name=name: f"{schedule} {name}: {m}")
    stats = gather_all(world, pipe.stats)
    if schedule == "dfa":
        mats = [m for stage in gather_all(world, pipe.feedback_matrices()) for m in stage]
        ref_mats = next(m for m in ref.modules() if isinstance(m, dk.DFA)).feedback_matrices()
        assert len(mats) == len(ref_mats) and all(torch.equal(a, b) for a, b in zip(mats, ref_mats))
        assert all(s.bytes_gradients == 0 for s in stats)  # no activation gradient travels
        width = {"mlp": 5, "recsys": 1}.get(kind, 16 if pipe.parts.head is not None else 17)
        e_bytes = 4 * width * (x[0].shape[0] if kind == "recsys" else x.numel() // (1 if kind == "lm" else 12))
        assert stats[-1].bytes_errors == (world.size - 1) * e_bytes  # e once to every other stage
        assert all(s.bytes_errors == 0 for s in stats[:-1])
        order = [(k, m) for k, m, *_ in stats[0].events]
        assert [m for k, m in order if k == "F"] == list(range(M)) and sorted(m for k, m in order if k == "B") == list(
            range(M)
        )
    else:  # each activation's gradient comes back across its cut; step 1 (torch infers shapes) counts the same
        assert all(s.bytes_errors == 0 for s in stats)
        assert all(stats[s].bytes_gradients == stats[s - 1].bytes_activations > 0 for s in range(1, world.size))
        first = gather_all(world, first_step)
        assert [(f.bytes_activations, f.bytes_gradients) for f in first] == [
            (s.bytes_activations, s.bytes_gradients) for s in stats
        ]


def _equivalence_worker(world, cases):
    for build, kind, schedule, M, adam in cases:
        run_case(world, build, kind, schedule, M, adam)


def _mlp2(mode):
    return mlp(mode, 2)


def _mlp4(mode):
    return mlp(mode, 4)


def _lm_macro(mode):
    return lm(mode, 2)


def _lm_linear_logits(mode):
    return lm(mode, 2, "linear", "logits")


def _lm_micro4(mode):
    return lm(mode, 4, "micro")


def _autoint(mode):
    return recsys(AutoInt, mode)


def _afn(mode):
    return recsys(AFN, mode)


def _deepfm(mode):
    return recsys(DeepFM, mode)


def _dcn(mode):
    return recsys(DCN, mode)


def test_two_stages_equal_one_process():
    spawn(
        _equivalence_worker,
        [
            (_mlp2, "mlp", "dfa", 3, False),
            (_lm_macro, "lm", "dfa", 2, True),
            (_lm_linear_logits, "lm", "dfa", 4, True),
            (_mlp2, "mlp", "gpipe", 3, False),
            (_lm_macro, "lm", "1f1b", 2, True),
        ],
    )


def test_recommender_trunks_equal_one_process():
    """AutoInt and AFN (two inputs reach the embeddings on stage 0; AFN's BatchNorms see the same
    microbatches as the single process) over 2 and 3 stages, DFA's schedule (an 11-row batch between
    12-row ones: unequal microbatches, each loss weighted by its rows) and BP's 1F1B."""
    spawn(
        _equivalence_worker,
        [(_autoint, "recsys", "dfa", 3, True), (_afn, "recsys", "dfa", 2, True), (_autoint, "recsys", "1f1b", 2, True)],
    )
    spawn(_equivalence_worker, [(_afn, "recsys", "dfa", 3, True)], size=3)


def test_recommender_branches_equal_one_process():
    """DeepFM (its FM part a skip branch beside the MLP: stage 0 backpropagates it from the e it
    receives) and DCN (the cross stack and the MLP side by side: a tuple crosses every cut) over 2
    and 3 stages, DFA's schedule and BP's GPipe / 1F1B (the branch's gradient travels back there).
    SGD: their MLP blocks' biases before a BatchNorm get a gradient of rounding noise (~1e-6, its
    sign set by the GEMM's blocking), which Adam would scale up to full steps."""
    spawn(
        _equivalence_worker,
        [
            (_deepfm, "recsys", "dfa", 3, False),
            (_dcn, "recsys", "dfa", 2, False),
            (_deepfm, "recsys", "1f1b", 2, False),
            (_dcn, "recsys", "gpipe", 2, False),
        ],
    )
    spawn(_equivalence_worker, [(_deepfm, "recsys", "dfa", 2, False), (_dcn, "recsys", "dfa", 3, False)], size=3)


def _two_d_worker(world, schedule):
    """2 replicas x 2 stages: each replica steps its half of the batch; the run equals one process
    accumulating the 2 x M microbatches of the whole batch (loss / 2M)."""
    M, mode = 2, "bp" if schedule != "dfa" else "dfa"
    parts, model, _ = _mlp2(mode)
    _, ref, ref_loss = _mlp2(mode)
    pipe_group, data_group = pl.pipeline_groups(2)
    replica = world.rank // 2
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    data = batches("mlp", STEPS)
    pipe = pl.Pipeline(parts, 2, M, data[0][0][:2], schedule=schedule, group=pipe_group, data_group=data_group)
    for x, t in data:
        opt.zero_grad(set_to_none=True)
        loss = pipe.step(x.chunk(2)[replica], t.chunk(2)[replica])
        opt.step()
        ref_total = reference_step(ref, ref_opt, ref_loss, x, t, 2 * M)
        assert loss.item() == pytest.approx(ref_total, rel=1e-5)
    pipe.synchronize()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-6, msg=lambda m, name=name: f"{schedule} {name}: {m}")
    stats = gather_all(world, pipe.stats)
    owned = sum(p.numel() for p in pipe.parameters()) * 4 + 4  # its gradients and the loss, fp32
    assert stats[world.rank].bytes_allreduce == owned > 4


@pytest.mark.parametrize("schedule", ["dfa", "1f1b"])
def test_pipeline_times_data_parallel_equals_one_process(schedule):
    spawn(_two_d_worker, schedule, size=4)


def test_pipeline_groups_refuse_a_stage_count_that_does_not_divide_the_world():
    spawn(_groups_refusal_worker)


def _groups_refusal_worker(world):
    with pytest.raises(ValueError, match="must divide the world size"):
        pl.pipeline_groups(3)


def test_four_stages_equal_one_process():
    spawn(
        _equivalence_worker,
        [(_mlp4, "mlp", "dfa", 4, False), (_lm_micro4, "lm", "dfa", 4, True), (_mlp4, "mlp", "1f1b", 4, False)],
        size=4,
    )


# ---------------------------------------------------------------- refusals
class Plain(nn.Module):
    """A block with no feedback point."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x):
        return self.layer(x)


def _refusal_worker(world):
    def point_block(dfa):
        return pl.parts._Point(nn.Linear(6, 6), dfa, "relu")

    x = torch.randn(4, 6)

    def refused(match, parts, **kw):
        with pytest.raises(ValueError, match=match):
            pl.Pipeline(parts, kw.pop("stages", 2), kw.pop("microbatches", 2), x, **kw)

    dfa = dk.DFA(seed=0)
    refused("larger than the model's 1 cuttable blocks", pl.Parts(dfa, [point_block(dfa)], suffix=nn.Linear(6, 3)))
    refused("stage 1 .* has no feedback point", pl.Parts(dfa, [point_block(dfa), Plain()], suffix=nn.Linear(6, 3)))
    refused("spans the cut between stages 0 and 1", pl.Parts(dfa, [Plain(), point_block(dfa)], suffix=nn.Linear(6, 3)))
    refused("must equal the process group's size", pl.Parts(dfa, [point_block(dfa)] * 3), stages=3)
    refused(
        "cuts must be 3 increasing block indices", pl.Parts(dfa, [point_block(dfa), point_block(dfa)]), cuts=[0, 2, 2]
    )
    shared = point_block(dfa)
    refused("used by stages 0 and 1", pl.Parts(dfa, [shared, shared], suffix=nn.Linear(6, 3)))
    for mode in ("shallow", "fa", "drtp", "bp"):
        other = dk.DFA(mode=mode, seed=0)
        refused(f"schedule 'dfa' needs a DFA mode .* mode '{mode}'", pl.Parts(other, [point_block(other)] * 2))
    refused("schedule 'gpipe' is backprop's", pl.Parts(dfa, [point_block(dfa), point_block(dfa)]), schedule="gpipe")
    refused("schedule must be one of", pl.Parts(dfa, [point_block(dfa), point_block(dfa)]), schedule="zb")
    refused("microbatches must be a positive int", pl.Parts(dfa, [point_block(dfa), point_block(dfa)]), microbatches=0)
    pipe = pl.Pipeline(pl.Parts(dfa, [point_block(dfa), point_block(dfa)], suffix=nn.Linear(6, 3)), 2, 3, x)
    with pytest.raises(ValueError, match=r"at least microbatches=3; got rows \[2\]"):
        pipe.step(x[:2], torch.zeros(2, dtype=torch.long))


def test_bad_configurations_refused():
    spawn(_refusal_worker)


def test_needs_a_process_group():
    dfa = dk.DFA(seed=0)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        pl.Pipeline(pl.Parts(dfa, [nn.Linear(2, 2)]), 1, 1, torch.zeros(1, 2))
    with pytest.raises(TypeError, match="no pipeline description of Linear"):
        pl.parts_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="non-empty list of nn.Modules"):
        pl.Parts(dfa, [])


def test_balanced_cuts():
    assert pl.balanced_cuts(10, 4) == [0, 3, 6, 8, 10]
    assert pl.balanced_cuts(4, 4) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="stages=5 is larger than the model's 4 cuttable blocks"):
        pl.balanced_cuts(4, 5)


def test_stage_spec_is_the_global_columns():
    """A stage's projection equals the whole model's projection's columns (both layouts)."""
    e = torch.randn(7, 5)
    for layout in ("independent", "shared"):
        spec = dk.FeedbackSpec(5, (3, 8, 4, 6), seed=9, layout=layout)
        whole = dk.ops.project_points(e, spec, "virtual", "cpu")
        part = dk.ops.project_points(e, pl.stage_spec(spec, 1, 3), "virtual", "cpu", scales=spec.scales()[1:3])
        ref = dk.ops.project_points(e, spec, "virtual", "torch")
        for a, b, c in zip(part, whole[1:3], ref[1:3]):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c)


# ---------------------------------------------------------------- the zoo's loop, checkpoints, the CLI
def lm_run():
    model, _, _ = lm("dfa", 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def evaluate(m, split):
        x, t = batches("lm", 1)[0]
        with torch.no_grad():
            return {"loss": F.cross_entropy(m(x).flatten(0, 1), t.flatten()).item()}

    def draw(g):
        return torch.randint(0, 17, (4, 8), generator=g), torch.randint(0, 17, (4, 8), generator=g)

    return Run(
        model=model,
        optimizer=opt,
        batches=Sampled(draw, 0),
        loss=None,
        evaluate=evaluate,
        select="loss",
        higher_is_better=False,
        epochs=2,
        steps_per_epoch=3,
        clip_grad=1.0,
    )


def _resume_worker(world):
    """6 steps in one session == 4 steps, a checkpoint state, a fresh run loading it, 2 more."""
    straight = PipelineTrainer(lm_run(), world, 2, progress=False)
    fit = straight.fit()

    def stop_at_4(trainer):
        if trainer.step == 4:
            raise Stopped("4")

    first = PipelineTrainer(lm_run(), world, 2, progress=False)
    with pytest.raises(Stopped):
        first.fit(stop_at_4)
    state = first.state_dict()
    again = PipelineTrainer(lm_run(), world, 2, progress=False)
    again.load_state_dict(state)
    resumed = again.fit()
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in fit.history]
    for p, q in zip(straight.run.model.parameters(), again.run.model.parameters()):
        assert torch.equal(p, q)


def test_trainer_resumes_exactly():
    spawn(_resume_worker)


def run_cli(args):
    """``python -m dfa_kernels ARGS`` in a child process, one thread per worker."""
    return subprocess.run(
        [sys.executable, "-m", "dfa_kernels", *args],
        capture_output=True,
        text=True,
        env=child_env(OMP_NUM_THREADS="1"),
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("replicas", [1, 2])
def test_cli_pipeline_trains_a_task(tmp_path, replicas):
    """``dfa-kernels train lm-pydoc --pipeline 2 [--nproc 2]``: 2 (x 2 replicas) workers, one metrics
    file with the pipeline."""
    out = run_cli(
        [
            "train",
            "lm-pydoc",
            "--epochs",
            "1",
            "--pipeline",
            "2",
            "--microbatches",
            "2",
            "--nproc",
            str(replicas),
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    folder = "dfa-macro-pipeline2x2" + ("x2" if replicas > 1 else "")
    metrics = json.loads((tmp_path / "lm-pydoc" / folder / "metrics.json").read_text())
    traffic = metrics["pipeline"].pop("bytes_per_step")  # e after the final LN: as wide as the cut's activation
    assert traffic["gradients"] == 0 and traffic["errors"] == traffic["activations"] > 0
    assert (traffic["allreduce"] > 0) == (replicas > 1)
    assert metrics["pipeline"] == {
        "stages": 2,
        "replicas": replicas,
        "microbatches": 2,
        "schedule": "dfa",
        "cuts": [0, 1, 2],
        "backend": "gloo",
    }
    assert math.isfinite(metrics["final"]["test_loss"]) and metrics["provenance"]["git_sha"]
    bad = subprocess.run(
        [sys.executable, "-m", "dfa_kernels", "train", "lm-pydoc", "--pipeline", "1"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2 and "--pipeline S needs S >= 2" in bad.stderr


@pytest.mark.parametrize(
    "task, cuts", [("autoint-ml100k", [0, 2, 4]), ("deepfm-ml100k", [0, 2, 3]), ("dcn-ml100k", [0, 4, 8])]
)
def test_cli_pipeline_trains_a_recommender(task, cuts, tmp_path):
    """``dfa-kernels train TASK --pipeline 2``: batches of row indices become (idx, bag) inputs and
    labels through the task's Run.io; the epoch's last batch (odd rows) splits unevenly. AutoInt is
    a chain, DeepFM's FM part a skip branch, DCN's state a tuple (x0, cross, MLP)."""
    out = run_cli(
        ["train", task, "--epochs", "1", "--pipeline", "2"]
        + ["--microbatches", "2", "--no-progress", "--out", str(tmp_path)]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / task / "dfa-pipeline2x2" / "metrics.json").read_text())
    assert metrics["pipeline"]["cuts"] == cuts and 0.5 < metrics["final"]["test_auc"] <= 1.0
    traffic = metrics["pipeline"]["bytes_per_step"]  # every rank's sends per step: e (one logit per row), no gradient
    assert traffic["gradients"] == 0 and 0 < traffic["errors"] < traffic["activations"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["autoint-ml100k", "--mode", "bp"], "batches of [495] rows do not split into 1 replica(s) x 2"),
        (["lm-pydoc", "--pipeline", "3"], "stages=3 is larger than the model's 2 cuttable blocks"),
        (["lm-pydoc", "--mode", "fa"], "--pipeline trains the modes dfa, sdfa, ternary"),
        (["lm-pydoc", "--mode", "bp", "--pipeline", "2", "--microbatches", "1"], "--microbatches 1 is fewer than"),
    ],
)
def test_cli_refuses_a_pipeline_in_one_line_before_launching(argv, message, capsys):
    """Checked in the launching process: one line and exit 2, no worker started."""
    from dfa_kernels import cli

    with pytest.raises(SystemExit) as exit:
        cli.main(["train", argv[0], "--microbatches", "2", "--pipeline", "2", *argv[1:]])  # argv's options win
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_bp_pipeline_refuses_batches_that_do_not_split_evenly():
    """torch's pipeline stages need equal microbatches: a task whose last batch does not split is
    refused before training, by name (DFA's schedule trains it)."""
    spawn(_uneven_bp_worker)


def _uneven_bp_worker(world):
    parts, model, _ = _autoint("bp")
    run = Run(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        batches=Shuffled(23, 8, seed=0),  # 8, 8 and a last batch of 7
        loss=lambda m, rows: torch.zeros(()),
        evaluate=lambda m, split: {"loss": 0.0},
        select="loss",
        higher_is_better=False,
        epochs=1,
        steps_per_epoch=3,
        io=lambda rows: ((rows[:, None].expand(-1, 3) % 20, torch.zeros(len(rows), 0)), rows.float() % 2),
    )
    with pytest.raises(ValueError, match=r"need equal microbatches.*batches of \[7\] rows do not split"):
        PipelineTrainer(run, world, microbatches=2, progress=False)


# ---------------------------------------------------------------- the event-driven model
def test_simulated_bp_schedules_have_the_textbook_bubble():
    """No communication cost, equal stages: GPipe and 1F1B take (M + S - 1)(f + b)."""
    costs = simulate.Costs([1.0] * 4, [2.0] * 4, [10] * 3)
    for schedule in ("gpipe", "1f1b"):
        out = simulate.simulate(schedule, costs, 8)
        assert out["step_s"] == pytest.approx(11 * 3.0)
        assert out["bubble"] == pytest.approx(1 - 8 * 3 / 33)
        assert out["bytes"] == simulate.bytes_per_step(schedule, costs, 8) == 2 * 8 * 30


def test_simulated_dfa_schedule():
    """DFA: one stage has no bubble; equal stages: the last one starts after (S - 1) forwards and is
    never idle, (S - 1) f + M (f + b); a latency adds one per hop of the forward wave; cores shared."""
    one = simulate.simulate("dfa", simulate.Costs([1.0], [0.5], []), 4)
    assert one["step_s"] == pytest.approx(6.0) and one["bubble"] == pytest.approx(0.0)
    costs = simulate.Costs([1.0] * 4, [0.25] * 4, [10] * 3, error_bytes=4)
    out = simulate.simulate("dfa", costs, 8)
    assert out["step_s"] == pytest.approx(3 + 8 * 1.25)
    assert out["bytes"] == simulate.bytes_per_step("dfa", costs, 8) == 8 * 30 + 8 * 3 * 4
    slow = simulate.simulate("dfa", costs, 8, simulate.Link(latency_s=0.5))
    assert slow["step_s"] == pytest.approx(3 + 8 * 1.25 + 3 * 0.5)  # 3 hops; e's own hop overlaps
    shared = simulate.simulate("dfa", simulate.Costs([1.0] * 2, [0.0] * 2, [0]), 1, cores=1)
    assert shared["step_s"] == pytest.approx(2.0)
    assert simulate.simulate("gpipe", costs, 8)["step_s"] > out["step_s"]
    with pytest.raises(ValueError, match="one entry per stage"):
        simulate.Costs([1.0], [1.0, 2.0], [])
    with pytest.raises(ValueError, match="schedule must be one of"):
        simulate.simulate("zb", costs, 2)
