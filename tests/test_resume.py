"""Checkpoints and exact resume: a run interrupted after step k and resumed from its last checkpoint
continues with the same losses, bit for bit (CPU), and ends with the same results; one task of
each zoo family, a distributed run, the CLI's metrics.json; checkpoints of another run are refused
by name; a crash while saving never leaves a partial checkpoint. And the numbers of the
single-process trainer are pinned to those of the loop before it became resumable."""

import dataclasses
import json

import pytest
import torch
from distributed_utils import spawn

from dfa_kernels.zoo import checkpoint, tasks
from dfa_kernels.zoo.checkpoint import Checkpoints
from dfa_kernels.zoo.training import run_task, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Exception):
    """A simulated interruption (a killed job), injected after a given step."""


def session(task, config, checkpoints=None, crash_after=None, world=None):
    """(losses of every step this session ran, TrainResult or None when it crashed)."""
    losses = []

    def on_step(trainer):
        losses.append(trainer.epoch_losses[-1])
        if trainer.step == crash_after:
            raise Crash

    try:
        return losses, train(tasks.get(task), config, checkpoints=checkpoints, on_step=on_step, world=world)
    except Crash:
        return losses, None


def without_wall_time(result) -> dict:
    return {
        "history": [{k: v for k, v in row.items() if k != "seconds"} for row in result.history],
        "final": {k: v for k, v in result.final.items() if k != "train_seconds"},
        "alignment": result.alignment,
        "config": result.config,
    }


def assert_resumes_exactly(task, config, path, every, crash_after, world=None):
    """Uninterrupted run vs. (crash after `crash_after`, resume from the last checkpoint)."""
    full_losses, full = session(task, config, world=world)
    done, crashed = session(task, config, Checkpoints(path, every=every), crash_after=crash_after, world=world)
    assert crashed is None and len(done) == crash_after
    saved_at = crash_after // every * every
    assert torch.load(path, weights_only=True)["trainer"]["step"] == saved_at
    rest, resumed = session(task, config, Checkpoints(path, every=every, resume=path), world=world)
    assert rest == full_losses[saved_at:]  # float equality: bit for bit
    assert done[:saved_at] == full_losses[:saved_at]
    assert without_wall_time(resumed) == without_wall_time(full)
    assert resumed.resumed_at == [saved_at]
    for name, value in full.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.model.state_dict()[name], value), name
    return full


# ------------------------------------------------------------------ the trainer's numbers did not move
def test_pinned_losses_of_the_loop_before_resume():
    """Losses and metrics computed with the loop as it was before the Trainer (commit 759b891):
    same seeds, same numbers (rel 1e-6: another order of random draws would move them by far more)."""
    pytest.importorskip("torch_geometric")
    gcn = train(tasks.get("gcn-cora"), tasks.TrainConfig("gcn-cora", epochs=4, progress=False))
    assert [h["train_loss"] for h in gcn.history] == pytest.approx(
        [1.9459197521209717, 1.9461262226104736, 1.9459383487701416, 1.944129467010498], rel=1e-6
    )
    assert gcn.final["val_loss"] == pytest.approx(1.9459971189498901, rel=1e-6)
    assert gcn.final["test_acc"] == pytest.approx(0.1850000023841858, rel=1e-6)
    lm = train(tasks.get("lm-pydoc"), tasks.TrainConfig("lm-pydoc", epochs=1, placement="micro", progress=False))
    assert lm.history[0]["train_loss"] == pytest.approx(3.686050033569336, rel=1e-6)
    assert lm.final["val_loss"] == pytest.approx(3.1213669180870056, rel=1e-6)
    assert lm.final["test_loss"] == pytest.approx(3.0669187903404236, rel=1e-6)


# ------------------------------------------------------------------ one task of each family
def test_graph_resumes_exactly(tmp_path):
    """Full-batch GCN: dropout draws from the global RNG, every checkpoint falls between a step and
    the epoch's evaluation; alignment measurements are part of the state."""
    pytest.importorskip("torch_geometric")
    config = tasks.TrainConfig("gcn-cora", epochs=7, progress=False, alignment_every=3)
    full = assert_resumes_exactly("gcn-cora", config, tmp_path / "ckpt.pt", every=2, crash_after=5)
    assert [m["step"] for m in full.alignment] == [3, 6, 7]


def test_recsys_resumes_exactly(tmp_path, monkeypatch):
    """DeepFM (dropout, BatchNorm buffers) on shuffled mini-batches: the stream's pass and position."""
    from dfa_kernels.zoo.recipes import recsys as R

    monkeypatch.setattr(R, "BATCH_SIZE", 16384)  # 5 steps per pass over MovieLens' 80k rows
    monkeypatch.setitem(
        R.PRESETS, "cpu", {**R.PRESETS["cpu"], "deepfm": dict(embed_dim=4, hidden=(16, 16), dropout=0.5)}
    )
    config = tasks.TrainConfig("deepfm-ml100k", epochs=3, progress=False)
    assert_resumes_exactly("deepfm-ml100k", config, tmp_path / "ckpt.pt", every=4, crash_after=6)


def test_transformer_resumes_exactly(tmp_path, monkeypatch):
    """The LM (fused micro placement, warmup + cosine LambdaLR, gradient clipping), checkpoints in
    the middle of an epoch."""
    from dfa_kernels.zoo.recipes import transformer as R

    monkeypatch.setitem(
        R.TRAIN, "lm-pydoc", {"cpu": {**R.TRAIN["lm-pydoc"]["cpu"], "steps_per_epoch": 4, "eval_tokens": 1024}}
    )
    config = tasks.TrainConfig("lm-pydoc", epochs=3, placement="micro", progress=False)
    assert_resumes_exactly("lm-pydoc", config, tmp_path / "ckpt.pt", every=3, crash_after=8)


def test_nerf_resumes_exactly(tmp_path, monkeypatch):
    """NeRF (stratified sample jitter from the global RNG, exponential LambdaLR) on a small
    NeRF-synthetic folder."""
    from test_zoo_nerf import TINY, synthetic_scene

    from dfa_kernels.zoo.data import nerf_scenes as S
    from dfa_kernels.zoo.recipes import nerf as R

    monkeypatch.setitem(
        R.PRESETS, "tiny", dict(scene="duck", size=8, views=(4, 1, 1), batch_rays=32, blocks=2, block_iters=3, **TINY)
    )
    monkeypatch.setitem(R.LR, "tiny", {"bp": 5e-3, "dfa": 5e-3, "shallow": 5e-3})
    S.write_blender(synthetic_scene(n=(4, 1, 1), size=8), tmp_path / "scene")
    config = tasks.TrainConfig("nerf", preset="tiny", data=str(tmp_path / "scene"), progress=False)
    assert_resumes_exactly("nerf", config, tmp_path / "ckpt.pt", every=2, crash_after=5)


def _distributed_resume(world, path):
    config = tasks.TrainConfig("gcn-cora", epochs=5, progress=False)
    assert_resumes_exactly("gcn-cora", config, path, every=2, crash_after=3, world=world)


def test_distributed_run_resumes_exactly(tmp_path):
    """Two ranks (DDP, gloo), resumed with the same world size: the same losses bit for bit."""
    pytest.importorskip("torch_geometric")
    spawn(_distributed_resume, tmp_path / "ckpt.pt")


# ------------------------------------------------------------------ the CLI's files
def _metrics(path):
    m = json.loads(path.read_text())
    for key in ("wall_time_s", "provenance"):
        m.pop(key)
    m["history"] = [{k: v for k, v in row.items() if k != "seconds"} for row in m["history"]]
    m["final"].pop("train_seconds")
    m["run_config"].pop("out")
    return m


def test_stop_and_resume_writes_the_same_metrics(tmp_path):
    """run_task (dfa-kernels train): --stop-after k, then --resume, gives the metrics.json of the
    uninterrupted run (wall times and provenance aside); the checkpoint loads with weights_only."""
    pytest.importorskip("torch_geometric")
    task = tasks.get("gcn-cora")
    base = tasks.TrainConfig("gcn-cora", epochs=4, progress=False)
    run_task(task, dataclasses.replace(base, out=tmp_path / "full"))
    part = dataclasses.replace(base, out=tmp_path / "part")
    assert run_task(task, part, checkpoint_every=10, stop_after=3) is None
    folder = tmp_path / "part" / "gcn-cora" / "dfa"
    assert not (folder / "metrics.json").exists()
    state = torch.load(folder / checkpoint.FILENAME, weights_only=True)
    assert state["trainer"]["step"] == 3 and state["identity"]["feedback"]["dfa"]["widths"] == [16]
    run_task(task, part, resume=folder)
    assert _metrics(folder / "metrics.json") == _metrics(tmp_path / "full" / "gcn-cora" / "dfa" / "metrics.json")
    assert json.loads((folder / "metrics.json").read_text())["provenance"]["resumed_at_steps"] == [3]


# ------------------------------------------------------------------ refusals
def test_refuses_a_checkpoint_of_another_run(tmp_path, monkeypatch):
    pytest.importorskip("torch_geometric")
    from dfa_kernels.zoo.recipes import graph as G

    path = tmp_path / "ckpt.pt"
    config = tasks.TrainConfig("gcn-cora", epochs=3, progress=False)
    with pytest.raises(Exception, match="stopped after step 1"):
        train(tasks.get("gcn-cora"), config, checkpoints=Checkpoints(path, stop_after=1))

    def resume(task="gcn-cora", run=None, **changes):
        train(
            tasks.get(task),
            dataclasses.replace(config, task=task, **changes),
            run=run,
            checkpoints=Checkpoints(path, resume=path),
        )

    with pytest.raises(ValueError, match=r"config\.seed: 0 in the checkpoint, 1 here"):
        resume(seed=1)
    with pytest.raises(
        ValueError,
        match=r"(?s)config\.feedback: 'paper' in the checkpoint, 'ours' here.*"
        r"feedback\.dfa\.layout: 'shared' in the checkpoint, 'independent' here",
    ):
        resume(feedback="ours")
    with pytest.raises(ValueError, match=r"task: 'gcn-cora' in the checkpoint, 'gat-cora' here"):
        resume("gat-cora")
    monkeypatch.setitem(G.PRESETS["cpu"], "gcn", dict(hidden=32))  # other widths
    with pytest.raises(
        ValueError,
        match=r"(?s)hyper_parameters\.hidden: 16 in the checkpoint, 32 here.*"
        r"model\.parameters\.conv1\.lin\.weight: \[16, 1433\] in the checkpoint, "
        r"\[32, 1433\] here",
    ):
        resume()
    monkeypatch.undo()
    run = tasks.get("gcn-cora").build(config)  # the same config, another feedback matrix
    run.model.dfa.seed, run.model.dfa.distribution = 5, "rademacher"
    with pytest.raises(
        ValueError,
        match=r"(?s)feedback\.dfa\.seed: 0 in the checkpoint, 5 here.*"
        r"feedback\.dfa\.distribution: 'uniform' in the checkpoint, 'rademacher'",
    ):
        resume(run=run)
    same = checkpoint.identity("gcn-cora", config, tasks.get("gcn-cora").build(config))
    with pytest.raises(ValueError, match=r"world_size: 1 in the checkpoint, 2 here"):
        checkpoint.load(path, {**same, "world_size": 2})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path / "elsewhere", {})


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"step": torch.tensor(1)}, path)

    def broken_save(obj, f):  # dies half way through writing
        f.write(b"\x80\x02partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_save({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_checkpoint_options_are_checked():
    with pytest.raises(ValueError, match="every must be a positive number of steps"):
        Checkpoints("x", every=0)
    with pytest.raises(ValueError, match="stop_after must be a positive number of steps"):
        Checkpoints("x", stop_after=-1)
