"""``dfa-kernels train TASK --pipeline S [--microbatches M]``: a zoo task trained by a pipeline.

Every rank builds the same run (same seed: same weights, same feedback spec, same batch stream),
runs its stage of each global batch (:class:`~.engine.Pipeline`: DFA's schedule in the DFA modes,
torch's 1F1B in mode "bp"), clips the whole model's gradient norm across stages and steps its
optimizer on its own parameters (the others get no gradient, so the run's optimizer skips them).
Evaluation and checkpoints see the whole model: before them every stage broadcasts its trained
parameters (:meth:`~.engine.Pipeline.synchronize`), and the optimizer state is gathered from the
stages (exact resume: ``--checkpoint-every``, ``--stop-after``, ``--resume`` as for one process).
Only tasks whose batches are ``(inputs, targets)`` and whose model the pipeline can cut
(:func:`~.parts.parts_of`: the Transformer LMs) are accepted.
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
from .engine import DFA_MODES, Pipeline


class PipelineTrainer(Trainer):
    """The zoo's training loop (evaluation rounds, early stopping, best model, checkpoints) with
    each step run by a :class:`Pipeline` over the ranks of `world`."""

    def __init__(self, run, world, microbatches: int, progress: bool = True, desc: str = "train"):
        self.microbatches = microbatches
        super().__init__(run, progress=progress, desc=desc, world=world, strategy="pipeline")

    def _setup(self, compile):
        run = self.run
        position = run.batches.state_dict()
        batch = next(run.batches)
        run.batches.load_state_dict(position)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)):
            raise ValueError(
                "--pipeline needs a task whose batches are (inputs, targets) tensors (the Transformer "
                f"LM tasks); this one's are {type(batch).__name__}"
            )
        mode = next(m for m in run.model.modules() if isinstance(m, DFA)).mode
        if mode not in (*DFA_MODES, "bp"):
            raise ValueError(
                f"--pipeline trains the modes {', '.join(DFA_MODES)} (DFA's schedule) and bp (1F1B); got mode {mode!r}"
            )
        device = next(run.model.parameters()).device
        self.pipe = Pipeline(
            run.model,
            self.world.size,
            self.microbatches,
            batch[0][:1],
            schedule="dfa" if mode != "bp" else "1f1b",
            device=device,
        )
        self.wrapper = None
        self._opt_step = run.optimizer.step

    def _train_step(self) -> None:
        run = self.run
        inputs, targets = next(run.batches)
        run.optimizer.zero_grad(set_to_none=True)
        loss = self.pipe.step(inputs, targets)
        if run.clip_grad is not None:
            self.pipe.clip_grad_norm_(run.clip_grad)
        self._opt_step()
        if run.scheduler is not None:
            run.scheduler.step()
        self.step += 1
        self.epoch_losses.append(loss.item())

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


def run_task(task, config, world, microbatches: int, *, checkpoint_every=None, resume=None, stop_after=None):
    """Train `task` on the ranks of `world` (one stage each); rank 0 writes
    OUT/TASK/VARIANT-pipelineSxM/metrics.json. Returns the fit on every rank (None when stopped)."""
    if world is None or world.size < 2:
        raise ValueError(
            "--pipeline S needs S >= 2 processes (it launches them itself; under torchrun, --nproc-per-node S)"
        )
    base = run_dir_of(task, config)
    run_dir = base.parent / f"{base.name}-pipeline{world.size}x{microbatches}"
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
        desc=f"{task.name} [{variant_name(task, config)}, pipeline {world.size}]",
    )
    strategy = f"pipeline-{trainer.pipe.schedule}-{microbatches}"

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
            print(f"{task.name} [pipeline {world.size}] {stop}; continue with --resume {run_dir}")
        return None
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
                "stages": world.size,
                "microbatches": microbatches,
                "schedule": trainer.pipe.schedule,
                "cuts": trainer.pipe.cuts,
                "backend": torch.distributed.get_backend(),
            },
            "wall_time_s": round(time.perf_counter() - start, 1),
            "provenance": provenance(),
        }
        if trainer.resumed_at:
            metrics["provenance"]["resumed_at_steps"] = trainer.resumed_at
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        _plot_curves({config.mode: fit.history}, run_dir / "curves.png", f"{task.name} ({config.mode}, pipeline)")
        print(
            f"{task.name} [{variant_name(task, config)}, pipeline {world.size}x{microbatches} "
            f"{trainer.pipe.schedule}] {task.metric} = {fit.final.get(task.metric)} -> {run_dir}/metrics.json"
        )
    return fit
