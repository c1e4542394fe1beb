"""``dfa-kernels train TASK --pipeline S [--microbatches M]``: a zoo task trained by a pipeline.

Every rank builds the same run (same seed: same weights, same feedback spec, same batch stream),
runs its stage of each global batch (:class:`~.engine.Pipeline`: DFA's schedule in the DFA modes,
torch's 1F1B in mode "bp"), clips the whole model's gradient norm across stages and steps its
optimizer on its own parameters (the others get no gradient, so the run's optimizer skips them).
Evaluation and checkpoints see the whole model: before them every stage broadcasts its trained
parameters (:meth:`~.engine.Pipeline.synchronize`), and the optimizer state is gathered from the
stages (exact resume: ``--checkpoint-every``, ``--stop-after``, ``--resume`` as for one process).
Only tasks whose batches are ``(inputs, targets)`` (or that a ``Run.io`` turns into them) and whose
model the pipeline can cut (:func:`~.parts.parts_of`: the Transformer LMs, AutoInt, AFN) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from ..nn import DFA
from ..provenance import provenance
from ..zoo import checkpoint, distributed
from ..zoo.trainer import Stopped, Trainer
from ..zoo.training import _plot_curves, run_dir_of, variant_name
from .engine import DFA_MODES, Pipeline, _rows, pipeline_groups

TRAFFIC = ("activations", "gradients", "errors", "headers", "allreduce")  # StepStats' bytes_* kinds


class PipelineTrainer(Trainer):
    """The zoo's training loop (evaluation rounds, early stopping, best model, checkpoints) with
    each step run by a :class:`Pipeline` over the ranks of `world`."""

    def __init__(
        self, run, world, microbatches: int, progress: bool = True, desc: str = "train", stages: int | None = None
    ):
        """`stages` S (default: the world's size); a world of S x R ranks runs R replicas of the
        pipeline (2-D), each on its 1/R share of every global batch."""
        self.microbatches = microbatches
        self.stages = world.size if stages is None else stages
        self.traffic, self.traffic_steps = dict.fromkeys(TRAFFIC, 0), 0  # this rank's bytes sent, this session
        super().__init__(run, progress=progress, desc=desc, world=world, strategy="pipeline")

    def _setup(self, compile):
        run = self.run
        self.replicas, groups = self.world.size // self.stages, {}
        batch, mode = check(run, self.stages, self.replicas, self.microbatches)
        device = next(run.model.parameters()).device
        if self.replicas > 1:
            groups["group"], groups["data_group"] = pipeline_groups(self.stages)
        self.pipe = Pipeline(
            run.model,
            self.stages,
            self.microbatches,
            _head(batch[0], 1),
            schedule="dfa" if mode != "bp" else "1f1b",
            device=device,
            **groups,
        )
        self.wrapper = None
        self._opt_step = run.optimizer.step

    def _train_step(self) -> None:
        run = self.run
        inputs, targets = as_pair(run, next(run.batches))
        rows = _rows(inputs)
        if self.replicas > 1:  # this replica's share of the global batch
            replica = self.world.rank // self.stages
            inputs, targets = _share(inputs, self.replicas, replica), targets.tensor_split(self.replicas)[replica]
        run.optimizer.zero_grad(set_to_none=True)
        loss = self.pipe.step(inputs, targets, batch_rows=rows)
        for kind in TRAFFIC:
            self.traffic[kind] += getattr(self.pipe.stats, f"bytes_{kind}")
        self.traffic_steps += 1
        if run.clip_grad is not None:
            self.pipe.clip_grad_norm_(run.clip_grad)
        self._opt_step()
        if run.scheduler is not None:
            run.scheduler.step()
        self.step += 1
        self.epoch_losses.append(loss.item())

    def traffic_per_step(self) -> dict:
        """Bytes every rank together sent per training step this session, by kind (activations
        forward, activation gradients backward (BP), errors (DFA), shape headers, the replicas'
        all-reduce); a collective: every rank calls it."""
        totals = torch.tensor([float(self.traffic[k]) for k in TRAFFIC], dtype=torch.float64, device=self.pipe.device)
        torch.distributed.all_reduce(totals)
        return {k: v / max(self.traffic_steps, 1) for k, v in zip(TRAFFIC, totals.tolist())}

    def _evaluate(self, split: str) -> dict:
        self.pipe.synchronize()
        return distributed.evaluate(self, split)

    def state_dict(self) -> dict:
        self.pipe.synchronize()
        state = super().state_dict()
        state["optimizer"] = self.pipe.gather_optimizer_state(self.run.optimizer)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pipe.load_optimizer_state(self.run.optimizer, state["optimizer"])


def as_pair(run, batch):
    """A batch of `run` as the pipeline feeds it: (inputs, targets), through the task's Run.io."""
    return batch if run.io is None else run.io(batch)


def check(run, stages: int, replicas: int, microbatches: int) -> tuple:
    """Refuse, before any process group exists, a run the pipeline cannot train: its first batch
    (as inputs and targets) and its model's mode, or a ValueError/TypeError naming the problem
    (the CLI checks in the launching process, so a refusal is one line, not one per worker)."""
    from .parts import balanced_cuts, parts_of

    position = run.batches.state_dict()
    batch = as_pair(run, next(run.batches))
    run.batches.load_state_dict(position)
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and _tensors(batch[0])):
        raise ValueError(
            "--pipeline needs a task whose batches are (inputs, targets) tensors, or a Run.io that "
            f"makes them (the Transformer LMs, the recommender models); this one's are {type(batch).__name__}"
        )
    mode = next(m for m in run.model.modules() if isinstance(m, DFA)).mode
    if mode not in (*DFA_MODES, "bp"):
        raise ValueError(
            f"--pipeline trains the modes {', '.join(DFA_MODES)} (DFA's schedule) and bp (1F1B); got mode {mode!r}"
        )
    if mode == "bp" and microbatches < stages:
        raise ValueError(
            f"--microbatches {microbatches} is fewer than --pipeline {stages} stages, which torch's 1F1B "
            "schedule (mode bp) needs at least (DFA's schedule takes any)"
        )
    balanced_cuts(len(parts_of(run.model).blocks), stages)
    rows = _rows(batch[0])
    if rows < replicas * microbatches:
        raise ValueError(f"the batch's {rows} rows do not split into {replicas} replicas x {microbatches} microbatches")
    uneven = sorted(n for n in getattr(run.batches, "sizes", set)() if n % (replicas * microbatches))
    if mode == "bp" and uneven:
        raise ValueError(
            f"BP's pipeline stages (torch.distributed.pipelining) need equal microbatches, and this task's "
            f"batches of {uneven} rows do not split into {replicas} replica(s) x {microbatches}; "
            "choose --microbatches that divides them, or train a DFA mode (its schedule weights unequal ones)"
        )
    return batch, mode


def _tensors(inputs) -> bool:
    """A tensor, or a non-empty tuple of tensors (a model's several inputs)."""
    if isinstance(inputs, (tuple, list)):
        return bool(inputs) and all(isinstance(t, torch.Tensor) for t in inputs)
    return isinstance(inputs, torch.Tensor)


def _head(inputs, n: int):
    return tuple(t[:n] for t in inputs) if isinstance(inputs, (tuple, list)) else inputs[:n]


def _share(inputs, replicas: int, replica: int):
    if isinstance(inputs, (tuple, list)):
        return tuple(t.tensor_split(replicas)[replica] for t in inputs)
    return inputs.tensor_split(replicas)[replica]


def run_task(
    task, config, world, microbatches: int, *, stages=None, checkpoint_every=None, resume=None, stop_after=None
):
    """Train `task` on the ranks of `world`: S = `stages` (default: every rank) per pipeline, one
    stage each, world / S replicas; rank 0 writes OUT/TASK/VARIANT-pipelineSxM[xR]/metrics.json.
    Returns the fit on every rank (None when stopped)."""
    stages = world.size if world is not None and stages is None else stages
    if world is None or stages < 2 or world.size % stages:
        raise ValueError(
            "--pipeline S needs S >= 2 processes per replica (it launches them itself; under torchrun, "
            "--nproc-per-node S x replicas)"
        )
    replicas = world.size // stages
    base = run_dir_of(task, config)
    run_dir = base.parent / (f"{base.name}-pipeline{stages}x{microbatches}" + (f"x{replicas}" if replicas > 1 else ""))
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, out=run_dir)
    saved = checkpoint.read(resume) if resume else None
    if saved is not None:  # rebuilt with the first session's epochs (its schedule), trained to this budget
        budget = config.epochs
        config = dataclasses.replace(config, epochs=saved["identity"]["config"]["epochs"])
    run = task.build(dataclasses.replace(config, device=distributed.rank_device(config.device, world)))
    if saved is not None:
        run.epochs = budget or saved.get("epochs") or run.epochs
    trainer = PipelineTrainer(
        run,
        world,
        microbatches,
        progress=config.progress,
        desc=f"{task.name} [{variant_name(task, config)}, pipeline {stages}"
        + (f" x {replicas} replicas]" if replicas > 1 else "]"),
        stages=stages,
    )
    strategy = f"pipeline-{trainer.pipe.schedule}-{microbatches}" + (f"-{stages}x{replicas}" if replicas > 1 else "")

    def meta():
        return checkpoint.identity(task.name, config, run, world.size, strategy)

    on_step = None
    if checkpoint_every or resume or stop_after:
        if saved is not None:
            checkpoint.check_budget(saved, run.epochs, run.steps_per_epoch)
            trainer.load_state_dict(checkpoint.verify(saved, meta()))
        on_step = checkpoint.Checkpoints(run_dir / checkpoint.FILENAME, checkpoint_every, resume, stop_after).callback(
            meta
        )
    start = time.perf_counter()
    try:
        fit = trainer.fit(on_step)
    except Stopped as stop:
        if world.main:
            print(f"{task.name} [pipeline {stages}] {stop}; continue with --resume {run_dir}")
        return None
    traffic = trainer.traffic_per_step()
    if world.main:
        metrics = {
            "task": task.name,
            "mode": config.mode,
            "variant": variant_name(task, config),
            "run_config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
            "config": run.hyper_parameters,
            "history": fit.history,
            "final": fit.final,
            "pipeline": {
                "stages": stages,
                "replicas": replicas,
                "microbatches": microbatches,
                "schedule": trainer.pipe.schedule,
                "cuts": trainer.pipe.cuts,
                "backend": torch.distributed.get_backend(),
                "bytes_per_step": traffic,  # every rank's sends, mean over this session's steps
            },
            "wall_time_s": round(time.perf_counter() - start, 1),
            "provenance": provenance(),
        }
        if trainer.resumed_at:
            metrics["provenance"]["resumed_at_steps"] = trainer.resumed_at
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        _plot_curves({config.mode: fit.history}, run_dir / "curves.png", f"{task.name} ({config.mode}, pipeline)")
        print(
            f"{task.name} [{variant_name(task, config)}, pipeline {stages}x{microbatches}x{replicas} "
            f"{trainer.pipe.schedule}] {task.metric} = {fit.final.get(task.metric)} -> {run_dir}/metrics.json"
        )
    return fit
