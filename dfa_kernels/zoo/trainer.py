"""The zoo's training loop, shared by every recipe: steps, evaluation, model selection, early stopping.

A recipe builds a :class:`Run` (model, optimizer, a resumable stream of batches, the loss, an
evaluation of a split) and :func:`fit` trains it: up to ``epochs`` rounds of ``steps_per_epoch``
optimizer steps, each round followed by an evaluation on the validation split. The model kept is
the one with the best validation metric, and the test split is evaluated once, on that model:
selection never sees test data. With ``patience``, training stops after that many rounds without
a validation improvement; without it every run gets the same fixed budget. Both rules are the same
for bp, dfa and shallow, and the result says which one ended the run.

``alignment_every`` measures DFA's alignment with backprop (:func:`dfa_kernels.studies.alignment`)
every that many steps and at the last step, on the run's fixed ``probe`` batch, without changing
the training (no optimizer step, gradients, buffers and RNG states restored).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable

import torch
from torch import nn


# ---------------------------------------------------------------- batch streams
class FullBatch:
    """The same batch at every step (full-batch training on a graph)."""

    def __init__(self, batch: Any):
        self.batch = batch

    def __next__(self):
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Shuffled:
    """Mini-batches of row indices [0, rows), reshuffled every pass by a seeded generator.

    Batches smaller than ``min_size`` are skipped (BatchNorm needs 2 rows). ``len()`` is the
    number of batches per pass. The position (pass, batch, generator state) is part of the state,
    so a resumed stream continues exactly where it stopped.
    """

    def __init__(self, rows: int, batch_size: int, seed: int, min_size: int = 1):
        if rows < 1 or batch_size < 1:
            raise ValueError(f"rows and batch_size must be positive; got {rows} and {batch_size}")
        self.rows, self.batch_size, self.min_size = rows, batch_size, min_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None
        self.position = 0

    def __len__(self) -> int:
        full, rest = divmod(self.rows, self.batch_size)
        return full + (rest >= self.min_size and rest > 0)

    def __next__(self) -> torch.Tensor:
        while True:
            if self.order is None or self.position >= self.rows:
                self.order, self.position = torch.randperm(self.rows, generator=self.generator), 0
            batch = self.order[self.position:self.position + self.batch_size]
            self.position += self.batch_size
            if len(batch) >= self.min_size:
                return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


class Sampled:
    """A fresh random batch at every step, drawn by ``draw(generator)`` (random LM windows, rays)."""

    def __init__(self, draw: Callable[[torch.Generator], Any], seed: int):
        self.draw = draw
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self):
        return self.draw(self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """Everything one training run needs; built by a recipe (``Task.build``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Any                                        # FullBatch | Shuffled | Sampled: next() -> batch
    loss: Callable[[nn.Module, Any], torch.Tensor]      # the training loss of a batch
    evaluate: Callable[[nn.Module, str], dict]          # metrics of split "val" or "test" (names unprefixed)
    select: str                                         # the validation metric that selects the model
    higher_is_better: bool
    epochs: int                                         # evaluation rounds at most (the budget)
    steps_per_epoch: int
    patience: int | None = None                         # rounds without improvement before stopping
    scheduler: Any = None                               # stepped after every optimizer step
    plateau: Any = None                                 # ReduceLROnPlateau, stepped with the val metric
    clip_grad: float | None = None
    probe: Any = None                                   # fixed training batch for alignment measurements
    hyper_parameters: dict = dataclasses.field(default_factory=dict)
    finish: Callable[[nn.Module, Any], list[str]] | None = None  # (selected model, out dir) -> artefacts
    # (model) -> (features [n, d], integer labels [n], label names, what they are): the learned
    # representation the t-SNE study embeds
    represent: Callable[[nn.Module], tuple] | None = None


@dataclasses.dataclass
class Fit:
    history: list[dict]          # one row per round: epoch, step, train_loss, val_*, lr, seconds
    final: dict                  # val_* and test_* of the selected model, best_epoch, stopped, ...
    alignment: list[dict]        # measurements along training (empty without alignment_every)


def _better(value: float, best: float | None, higher: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if higher else value < best


def fit(run: Run, progress: bool = True, alignment_every: int | None = None, desc: str = "train") -> Fit:
    """Train `run` (see the module docstring); the model ends with the selected (best-validation) weights."""
    from tqdm.auto import tqdm

    model, opt = run.model, run.optimizer
    total = run.epochs * run.steps_per_epoch
    history: list[dict] = []
    measurements: list[dict] = []
    best, best_epoch, best_state, since_best = None, 0, None, 0
    stopped, step = "budget", 0
    if alignment_every is not None and run.probe is None:
        raise ValueError("alignment_every needs the run's probe batch (this recipe defines none)")
    start = time.perf_counter()
    with tqdm(total=total, disable=not progress, leave=False, desc=desc) as bar:
        for epoch in range(1, run.epochs + 1):
            model.train()
            losses = []
            for _ in range(run.steps_per_epoch):
                batch = next(run.batches)
                loss = run.loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if run.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip_grad)
                opt.step()
                if run.scheduler is not None:
                    run.scheduler.step()
                step += 1
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
                if alignment_every and (step % alignment_every == 0 or step == total):
                    measurements.append(_measure(run, step, epoch))
            metrics = run.evaluate(model, "val")
            value = metrics[run.select]
            if run.plateau is not None:
                run.plateau.step(value)
            row = {"epoch": epoch, "step": step, "train_loss": sum(losses) / len(losses),
                   **{f"val_{k}": v for k, v in metrics.items()}, "lr": opt.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - start, 2)}
            history.append(row)
            if _better(value, best, run.higher_is_better):
                best, best_epoch, since_best = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            if run.patience is not None and since_best >= run.patience:
                stopped = "patience"
                break
    if alignment_every and (not measurements or measurements[-1]["step"] != step):
        measurements.append(_measure(run, step, len(history)))  # the last step, when stopped early
    if best_state is not None:
        model.load_state_dict(best_state)
    test = run.evaluate(model, "test")
    val = {k: v for k, v in history[best_epoch - 1].items() if k.startswith("val_")} if best_epoch else {}
    final = {**{f"test_{k}": v for k, v in test.items()}, **val,
             "best_epoch": best_epoch, "epochs_run": len(history), "steps_run": step, "stopped": stopped,
             # the budget ended while the validation metric was still improving
             "still_improving_at_budget": stopped == "budget" and best_epoch == len(history),
             "train_seconds": round(time.perf_counter() - start, 1)}
    return Fit(history, final, measurements)


def _measure(run: Run, step: int, epoch: int) -> dict:
    import dfa_kernels as dk
    return {"step": step, "epoch": epoch, **dk.alignment(run.model, run.loss, run.probe)}
