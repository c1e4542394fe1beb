"""Distributed training with torch.distributed on CPU (gloo, 2 processes spawned by the tests).

DDP: a DFA model trains like one process on the whole batch (parameters equal to fp32 tolerance
after k steps, in modes dfa, bp and shallow); the feedback matrices are bit-identical on every rank
and only gradients are communicated; shallow mode needs find_unused_parameters (and gets it).
Full-batch graph training splits the training nodes. FSDP2 (fully_shard) on the zoo's Transformer
LM matches the unsharded run; the fused forms refuse sharded weights by name. The CLI's --nproc.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from child_process import child_env
from distributed_utils import gather_all, spawn
from torch import nn

import dfa_kernels as dk
from dfa_kernels.zoo import tasks
from dfa_kernels.zoo.distributed import LossModule
from dfa_kernels.zoo.trainer import Run, Shuffled, Trainer, shard_rows
from dfa_kernels.zoo.training import train

STEPS = 5


class MLP(nn.Module):
    """A plain point and a fused dfa.linear point."""

    def __init__(self, mode):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(12, 32), nn.Linear(32, 24), nn.Linear(24, 4)
        self.dfa = dk.DFA(mode=mode, seed=3)

    def forward(self, x):
        x = self.dfa.point(torch.tanh(self.l1(x)))
        x = self.dfa.linear(x, self.l2, "relu")
        return self.dfa(self.head(x))


def mlp_run(mode: str, steps: int = STEPS) -> Run:
    """Batches of 31 rows (16 + 15 on two ranks; a pass ends with 3 rows: 2 + 1)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(96, 12, generator=g), torch.randint(0, 4, (96,), generator=g)
    model = MLP(mode)

    def loss(model, rows):
        return F.cross_entropy(model(X[rows]), Y[rows])

    return Run(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        batches=Shuffled(96, 31, seed=2),
        loss=loss,
        evaluate=lambda model, split: {"loss": 0.0},
        select="loss",
        higher_is_better=False,
        epochs=1,
        steps_per_epoch=steps,
        shard=shard_rows,
    )


def assert_same_parameters(got: nn.Module, want: nn.Module, atol=1e-6, rtol=1e-5):
    for (name, p), q in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=rtol, msg=name)


def _ddp_worker(world):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    for mode in ("dfa", "bp", "shallow"):
        single = mlp_run(mode)
        expected = Trainer(single, progress=False).fit()
        run = mlp_run(mode)
        trainer = Trainer(run, progress=False, world=world)
        assert trainer.wrapper.find_unused_parameters == (mode == "shallow")
        sent = []

        def counting_hook(state, bucket, sent=sent):  # what DDP communicates: the gradient buckets
            sent.append(bucket.buffer().numel())
            return allreduce_hook(state, bucket)

        trainer.wrapper.register_comm_hook(None, counting_hook)
        got = trainer.fit()
        assert_same_parameters(run.model, single.model)
        assert got.history[0]["train_loss"] == pytest.approx(expected.history[0]["train_loss"], rel=1e-6)
        # the gradients and nothing else (no feedback matrix); in shallow mode the buckets of the
        # unused parameters are sent too (zeros), as DDP does with find_unused_parameters
        assert sum(sent) == STEPS * sum(p.numel() for p in run.model.parameters())
        params = gather_all(world, [p.detach() for p in run.model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*params))  # DDP keeps the ranks in sync
        if mode == "dfa":  # every rank regenerated the same matrices from the seed
            specs = gather_all(world, run.model.dfa.spec)
            matrices = gather_all(world, run.model.dfa.feedback_matrices())
            assert specs[0] == specs[1] and specs[0].widths == (32, 24)
            assert all(torch.equal(a, b) for a, b in zip(*matrices))
    # shallow mode without find_unused_parameters: the layers before the last point never get a
    # gradient, DDP's reduction never finishes, and the next step fails
    run = mlp_run("shallow")
    ddp = DDP(LossModule(run.model, run.loss), find_unused_parameters=False)
    with pytest.raises(RuntimeError, match="parameters that were not used in producing loss"):
        for _ in range(2):
            ddp(shard_rows(next(run.batches), world.rank, world.size)[0]).backward()


def test_ddp_trains_like_one_process_on_the_whole_batch():
    spawn(_ddp_worker)


def _graph_worker(world):
    """Full-batch GCN: every rank runs the whole graph (same dropout masks) and takes the loss of
    its half of the training nodes, weighted by its share: the single-process gradients."""
    config = tasks.TrainConfig("gcn-cora", epochs=3, progress=False)
    single = train(tasks.get("gcn-cora"), config)
    got = train(tasks.get("gcn-cora"), config, world=world)
    assert [h["train_loss"] for h in got.history] == pytest.approx([h["train_loss"] for h in single.history], rel=1e-6)
    assert got.final["val_acc"] == single.final["val_acc"]
    assert_same_parameters(got.model, single.model)
    data = tasks.get("gcn-cora").build(config).batches.batch
    from dfa_kernels.zoo.recipes.graph import shard_nodes

    parts = [shard_nodes(data, r, world.size) for r in range(world.size)]
    assert sum(share for _, share in parts) == 1.0
    assert not (parts[0][0].train_mask & parts[1][0].train_mask).any()
    assert torch.equal(parts[0][0].train_mask | parts[1][0].train_mask, data.train_mask)


def test_full_batch_graph_training_splits_the_training_nodes():
    pytest.importorskip("torch_geometric")
    spawn(_graph_worker)


def _fsdp_worker(world):
    from torch.distributed.fsdp import fully_shard

    from dfa_kernels.zoo.checkpoint import Checkpoints
    from dfa_kernels.zoo.distributed import full_model_state
    from dfa_kernels.zoo.models.transformer import TransformerLM
    from dfa_kernels.zoo.recipes import transformer as R

    R.TRAIN["lm-pydoc"]["cpu"].update(steps_per_epoch=3, eval_tokens=1024)  # this process only
    task = tasks.get("lm-pydoc")
    for placement, error_at in (("macro", "hidden"), ("micro", "hidden"), ("macro", "logits")):
        config = tasks.TrainConfig("lm-pydoc", epochs=2, placement=placement, progress=False)
        single = train(task, config, run=R.build_lm("lm-pydoc", config, error_at=error_at))
        run = R.build_lm("lm-pydoc", config, error_at=error_at)
        got = train(task, dataclasses.replace(config, fsdp=True), run=run, world=world)
        assert type(run.model.blocks[0].fc1.weight).__name__ == "DTensor"  # trained sharded
        assert [h["train_loss"] for h in got.history] == pytest.approx(
            [h["train_loss"] for h in single.history], rel=1e-5
        )
        assert got.final["test_loss"] == pytest.approx(single.final["test_loss"], rel=1e-5)
        full = full_model_state(run.model)
        for name, value in single.model.state_dict().items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(full[name], value, atol=2e-5, rtol=1e-4, msg=name)

    # a sharded run resumes exactly too (full state dicts gathered from the shards)
    config = tasks.TrainConfig("lm-pydoc", epochs=2, placement="micro", progress=False, fsdp=True)
    path = os.environ["CKPT"]
    whole_losses, rest = [], []
    whole = train(task, config, world=world, on_step=lambda t: whole_losses.append(t.epoch_losses[-1]))
    with pytest.raises(Exception, match="stopped after step 2"):
        train(task, config, world=world, checkpoints=Checkpoints(path, stop_after=2))
    resumed = train(
        task,
        config,
        world=world,
        checkpoints=Checkpoints(path, resume=path),
        on_step=lambda t: rest.append(t.epoch_losses[-1]),
    )
    assert rest == whole_losses[2:]
    assert resumed.final["test_loss"] == whole.final["test_loss"]

    # the fused forms and sharded weights: refused by name outside the gathering forward, and a
    # dfa.linear weight freed before the DFA backward needs is reported with the alternatives
    layer = fully_shard(nn.Linear(8, 8))
    dfa = dk.DFA()
    with pytest.raises(
        TypeError, match=r"dfa.linear\(x, layer\): the layer's weight is a sharded DTensor.*plain point"
    ):
        dfa.linear(torch.randn(2, 8), layer)
    dfa.point(torch.randn(2, 3, 4, requires_grad=True))
    with pytest.raises(TypeError, match=r"linear_cross_entropy.*sharded DTensor.*error_at='hidden'"):
        dfa.linear_cross_entropy(torch.randn(2, 3, 8), layer, torch.zeros(2, 3, dtype=torch.long))
    torch.manual_seed(0)
    model = TransformerLM(40, context=8, layers=2, d_model=16, heads=2, placement="micro")
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=True)
    fully_shard(model)
    x = torch.randint(0, 40, (2, 9))
    with pytest.raises(RuntimeError, match="was freed after the forward.*reshard_after_forward=False.*fused=False"):
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()


def test_fsdp2_dfa_training_matches_the_unsharded_run(tmp_path, monkeypatch):
    """FSDP2 on CPU with gloo (supported by torch 2.14): macro placement, fused micro placement
    (blocks keep their weights gathered after forward), the fused LM head (error_at='logits')."""
    monkeypatch.setenv("CKPT", str(tmp_path / "ckpt.pt"))
    spawn(_fsdp_worker)


def test_a_task_whose_batches_cannot_be_split_is_refused():
    """The graph autoencoder's loss reads all positive and negative edges: its recipe defines no
    shard, so a distributed run stops before any communication, saying why."""
    pytest.importorskip("torch_geometric")
    from dfa_kernels.zoo.distributed import World

    run = tasks.get("gae-cora").build(tasks.TrainConfig("gae-cora", epochs=1))
    with pytest.raises(ValueError, match="cannot be split across processes"):
        Trainer(run, world=World(0, 2))
    with pytest.raises(ValueError, match="fsdp shards the model across processes"):
        train(tasks.get("gcn-cora"), tasks.TrainConfig("gcn-cora", fsdp=True))


def test_cli_nproc_2_writes_one_metrics_file(tmp_path):
    """``dfa-kernels train gcn-cora --nproc 2`` (torch.distributed.run, 2 workers): one result line,
    one metrics.json, the single-process losses."""
    pytest.importorskip("torch_geometric")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfa_kernels",
            "train",
            "gcn-cora",
            "--epochs",
            "2",
            "--nproc",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("test_acc =") == 1, out.stdout
    metrics = json.loads((tmp_path / "gcn-cora" / "dfa" / "metrics.json").read_text())
    assert metrics["distributed"] == {"world_size": 2, "strategy": "ddp", "backend": "gloo"}
    single = train(tasks.get("gcn-cora"), tasks.TrainConfig("gcn-cora", epochs=2, progress=False))
    assert [h["train_loss"] for h in metrics["history"]] == pytest.approx(
        [h["train_loss"] for h in single.history], rel=1e-6
    )
