"""Training one zoo run on several processes with PyTorch's own engine (``torch.distributed``).

Launch: ``dfa-kernels train TASK --nproc N`` starts N workers through ``torch.distributed.run``
(torchrun's launcher), each running ``python -m dfa_kernels train TASK ...``; on several nodes run
``torchrun --nnodes ... -m dfa_kernels train TASK ...`` directly. A worker finds its rank in the
environment torchrun sets (:func:`init`).

What runs where:
- Every rank builds the same run (same seed: same initial weights, same feedback matrices) and
  draws the same global batch from the run's seeded stream; ``Run.shard`` gives each rank its
  part and the part's share of the loss. A rank's loss is weighted by ``share * world_size``, so
  the gradients DDP / FSDP2 average are those of the whole batch (unequal parts included).
- DDP (default): ``DistributedDataParallel`` around a :class:`LossModule` (the run's loss as a
  module's forward, so the wrapper sees every call whatever the loss calls on the model). The
  only communication is DDP's all-reduce of the gradients (and one scalar per step for the logged
  loss): DFA's feedback matrices are regenerated from the seed on every rank and never sent.
  ``find_unused_parameters`` is set exactly when some trainable parameter gets no gradient in a
  step: in mode "shallow" (the layers before the last feedback point are detached from the loss).
  In modes "dfa" and "bp" every parameter gets one (in "dfa", those before a point from the
  point's projected error).
- FSDP2 (``strategy="fsdp"``): ``fully_shard`` on each Transformer block (when the model has
  ``blocks``) and on the :class:`LossModule` root; the optimizer's groups are re-pointed at the
  sharded (DTensor) parameters. A block whose ``dfa.linear`` layers need their weight in the DFA
  backward (TransformerLM, micro placement, fused: the FFN input's gradient) keeps its weights
  gathered after forward (``reshard_after_forward=False``); see :func:`_reshard_after_forward`.
- Random numbers: when ranks see different rows, each rank reseeds its global RNG (dropout masks,
  NeRF's sample jitter) with a rank offset; full-batch runs (a graph: every rank runs the whole
  forward and reads only its nodes' loss) keep one RNG stream, so every rank draws the masks a
  single process would, and the averaged gradient is the single-process one.
- Evaluation and logging: DDP evaluates on rank 0 and broadcasts the metrics (early stopping
  decides the same on every rank); FSDP evaluates on every rank (gathering needs all). Only rank 0
  shows progress, prints and writes files.
- BatchNorm: converted to ``SyncBatchNorm`` on CUDA (the whole batch's statistics, as one process);
  SyncBatchNorm needs a GPU, so on a CPU each rank normalises by its own part's statistics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> World | None:
    """The process group torchrun described in the environment (``WORLD_SIZE`` > 1), initialised
    (gloo on a CPU, NCCL on CUDA); None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def current() -> World | None:
    """The World of an already initialised process group (None without one, or with one process)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``python -m dfa_kernels ARGV`` on `nproc` local processes through torchrun's launcher."""
    from torch.distributed import run as torchrun

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1; got {nproc}")
    torchrun.main(["--standalone", f"--nproc-per-node={nproc}", "--module", "dfa_kernels", *argv])


def rank_device(device: str, world: World | None) -> str:
    """A rank's device: "cuda" means the rank's own GPU (``cuda:LOCAL_RANK``)."""
    if world is not None and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def seed_per_rank(world: World) -> None:
    base = int(torch.randint(0, 2**62, (1,)))  # the same draw on every rank, then one stream per rank
    torch.manual_seed(base + world.rank)


# ---------------------------------------------------------------- wrapping
class LossModule(nn.Module):
    """The run's loss as a module's forward: DDP and FSDP2 act on ``forward`` calls, and a loss may
    call anything on the model (``model.loss(x, y)``, ``model.encode``)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def needs_unused_parameters(model: nn.Module) -> bool:
    """Whether some trainable parameter gets no gradient in a step (DDP's find_unused_parameters):
    in mode "shallow", the layers before the last feedback point are detached from the loss."""
    import dfa_kernels as dk

    return any(m.mode == "shallow" for m in model.modules() if isinstance(m, dk.DFA))


def wrap(run, world: World, strategy: str = "ddp") -> nn.Module:
    if strategy == "ddp":
        return _ddp(run, world)
    if strategy == "fsdp":
        return _fsdp(run)
    raise ValueError(f"strategy must be 'ddp' or 'fsdp'; got {strategy!r}")


def _ddp(run, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = run.model
    device = next(model.parameters()).device
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same Parameter objects: the optimizer keeps them
        elif world.main:
            warnings.warn(
                "BatchNorm on a CPU: each rank normalises by its own part of the batch (SyncBatchNorm "
                "needs a GPU), so this run is not the single-process one on the whole batch",
                stacklevel=2,
            )
    return DDP(
        LossModule(model, run.loss),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=needs_unused_parameters(model),
    )


def _reshard_after_forward(model: nn.Module) -> bool:
    """False when a block's fused ``dfa.linear`` layers are needed by the DFA backward: it computes
    their input's gradient (delta @ W) at the output op, before FSDP would gather the block again.
    That is TransformerLM's micro placement with fused=True (fc1, whose input ln2(x) needs a
    gradient); in the other placements no dfa.linear input needs one."""
    import dfa_kernels as dk

    dfa = getattr(model, "dfa", None)
    return not (
        isinstance(dfa, dk.DFA)
        and dfa.mode == "dfa"
        and getattr(model, "fused", False)
        and getattr(model, "placement", None) == "micro"
    )


def _fsdp(run) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = run.model
    before = dict(model.named_parameters())
    reshard = _reshard_after_forward(model)
    for block in getattr(model, "blocks", ()):
        fully_shard(block, reshard_after_forward=reshard)
    root = fully_shard(LossModule(model, run.loss))
    after = dict(model.named_parameters())
    sharded = {id(p): after[name] for name, p in before.items()}
    if run.optimizer.state:
        raise RuntimeError("FSDP: the optimizer has already stepped; shard the model before training")
    for group in run.optimizer.param_groups:  # fully_shard replaced the parameters by DTensors
        group["params"] = [sharded[id(p)] for p in group["params"]]
    return root


@contextlib.contextmanager
def gathered(root):
    """FSDP2: the root's own parameters gathered (the blocks gather themselves when called), so the
    model can be evaluated through any method, not only the root's forward; every module sharded
    again afterwards (blocks with reshard_after_forward=False would otherwise stay gathered after
    a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    root.unshard()
    try:
        yield
    finally:
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


# ---------------------------------------------------------------- collectives the trainer uses
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(obj, world: World | None):
    """Rank 0's `obj` on every rank."""
    if world is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World | None, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world is None:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def evaluate(trainer, split: str) -> dict:
    run = trainer.run
    if trainer.world is None:
        return run.evaluate(run.model, split)
    if trainer.strategy == "fsdp":
        with gathered(trainer.wrapper):
            metrics = run.evaluate(run.model, split)
        return broadcast(metrics, trainer.world)
    return broadcast(run.evaluate(run.model, split) if trainer.world.main else None, trainer.world)


# ---------------------------------------------------------------- state (checkpoints)
def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def model_state(trainer) -> dict:
    """The model's full state dict (a copy; FSDP: gathered from the shards, on every rank)."""
    if trainer.strategy == "fsdp":
        return full_model_state(trainer.run.model)
    return copy.deepcopy(trainer.run.model.state_dict())


def full_model_state(model: nn.Module) -> dict:
    """A sharded (FSDP2) model's whole state dict, gathered on every rank (collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options())
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def load_model_state(trainer, state: dict) -> None:
    if trainer.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(trainer.run.model, state, options=_full_options())
    else:
        trainer.run.model.load_state_dict(state)


def optimizer_state(trainer) -> dict:
    opt = trainer.run.optimizer
    if trainer.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(trainer.run.model, opt, options=_full_options())
    return copy.deepcopy(opt.state_dict())


def load_optimizer_state(trainer, state: dict) -> None:
    opt = trainer.run.optimizer
    if trainer.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(trainer.run.model, opt, state, options=_full_options())
    else:
        opt.load_state_dict(state)
