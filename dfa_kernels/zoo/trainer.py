"""The zoo's training loop, shared by every recipe: steps, evaluation, model selection, early stopping.

A recipe builds a :class:`Run` (model, optimizer, a resumable stream of batches, the loss, an
evaluation of a split) and :class:`Trainer` trains it (:func:`fit` is the one-call form): up to
``epochs`` rounds of ``steps_per_epoch`` optimizer steps, each round followed by an evaluation on
the validation split. The model kept is the one with the best validation metric, and the test
split is evaluated once, on that model: selection never sees test data. With ``patience``,
training stops after that many rounds without a validation improvement, never before round
``min_epochs`` (a model whose loss sits on a plateau at first is not stopped there); without it
every run gets the same fixed budget. Both rules are the same for bp, dfa and shallow, and the result says which
one ended the run.

``alignment_every`` measures DFA's alignment with backprop (``dk.alignment``, :mod:`dfa_kernels.align`)
every that many steps and at the last step, on the run's fixed ``probe`` batch, without changing
the training (no optimizer step, gradients, buffers and RNG states restored).

The trainer's whole state (model, optimizer, schedulers, the batch stream's position, every RNG,
counters, history, measurements, the best model so far, the patience counter) is
:meth:`Trainer.state_dict`, made of tensors and plain containers only: a run saved after step k
and loaded into a freshly built trainer continues bit for bit (:mod:`.checkpoint` writes and
checks the files). With a :class:`~.distributed.World`, the trainer runs one rank of a DDP or FSDP2
job (:mod:`.distributed`): every rank draws the same global batch and trains on its shard.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import dfa_kernels as dk
from dfa_kernels.layerwise import FeedbackLayer


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

    def sizes(self) -> set[int]:
        """The batch sizes a pass yields (the last batch is smaller unless the rows divide)."""
        full, rest = divmod(self.rows, self.batch_size)
        return ({self.batch_size} if full else set()) | ({rest} if rest >= max(1, self.min_size) else set())

    def __next__(self) -> torch.Tensor:
        while True:
            if self.order is None or self.position >= self.rows:
                self.order, self.position = torch.randperm(self.rows, generator=self.generator), 0
            batch = self.order[self.position : self.position + self.batch_size]
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


def shard_rows(batch, rank: int, world: int):
    """Rank `rank`'s contiguous share of a batch of rows (a tensor, or a tuple of tensors with
    the same first dim): ``(part, its fraction of the rows)``; for losses that are a mean over rows."""
    parts = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    rows = parts[0].shape[0]
    mine = tuple(t.tensor_split(world)[rank] for t in parts)
    share = mine[0].shape[0] / rows
    return (mine if isinstance(batch, (tuple, list)) else mine[0]), share


# ---------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """Everything one training run needs; built by a recipe (``Task.build``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Any  # FullBatch | Shuffled | Sampled: next() -> batch
    loss: Callable[[nn.Module, Any], torch.Tensor]  # the training loss of a batch
    evaluate: Callable[[nn.Module, str], dict]  # metrics of split "val" or "test" (names unprefixed)
    select: str  # the validation metric that selects the model
    higher_is_better: bool
    epochs: int  # evaluation rounds at most (the budget)
    steps_per_epoch: int
    patience: int | None = None  # rounds without improvement before stopping
    min_epochs: int = 0  # rounds always trained before patience may stop
    scheduler: Any = None  # stepped after every optimizer step
    plateau: Any = None  # ReduceLROnPlateau, stepped with the val metric
    clip_grad: float | None = None
    probe: Any = None  # fixed training batch for alignment measurements
    hyper_parameters: dict = dataclasses.field(default_factory=dict)
    finish: Callable[[nn.Module, Any], list[str]] | None = None  # (selected model, out dir) -> artefacts
    # (model) -> (features [n, d], integer labels [n], label names, what they are): the learned
    # representation the t-SNE study embeds
    represent: Callable[[nn.Module], tuple] | None = None
    # (global batch, rank, world size) -> (the rank's part, its share): how a distributed run splits
    # a batch; share_r * loss(part_r) summed over ranks is the loss of the whole batch. None: the
    # task's data cannot be split (one process only).
    shard: Callable[[Any, int, int], tuple[Any, float]] | None = None
    # (batch) -> the class targets of the DFA output's rows (indices, -1 where a row does not train,
    # or a float tensor shaped like the output): what mode "drtp" projects. None: no class targets.
    targets: Callable[[Any], torch.Tensor] | None = None
    # (batch) -> (inputs, targets) as a pipeline feeds them (inputs: a tensor, or a tuple of tensors
    # for a model taking several arguments; targets: what its loss compares the output with). None:
    # the batch is that pair already.
    io: Callable[[Any], tuple[Any, torch.Tensor]] | None = None


@dataclasses.dataclass
class Fit:
    history: list[dict]  # one row per round: epoch, step, train_loss, val_*, lr, seconds
    final: dict  # val_* and test_* of the selected model, best_epoch, stopped, ...
    alignment: list[dict]  # measurements along training (empty without alignment_every)


class Stopped(Exception):
    """Raised by an ``on_step`` callback to end a session early (the run can be resumed)."""


def _better(value: float, best: float | None, higher: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if higher else value < best


# ---------------------------------------------------------------- RNG states as tensors
def rng_state() -> dict:
    """Every RNG a step may draw from (torch CPU and CUDA, numpy, Python), as tensors and numbers
    (loadable with ``torch.load(weights_only=True)``)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss_next"]))


# ---------------------------------------------------------------- the loop
class Trainer:
    """Trains a :class:`Run` (see the module docstring); resumable through state_dict/load_state_dict.

    world: a :class:`~.distributed.World` to train one rank of a distributed job (``strategy``
      "ddp" or "fsdp"); None for one process (the run's own objects, unwrapped).
    compile: run the loss (the model's forward, and its backward through AOTAutograd) and the
      optimizer step under ``torch.compile``; True for the default backend (inductor), or a
      ``torch.compile`` backend (a name or a callable).
    """

    def __init__(
        self,
        run: Run,
        progress: bool = True,
        alignment_every: int | None = None,
        desc: str = "train",
        world=None,
        strategy: str = "ddp",
        compile=False,
    ):
        if alignment_every is not None and run.probe is None:
            raise ValueError("alignment_every needs the run's probe batch (this recipe defines none)")
        if alignment_every is not None and not any(isinstance(m, dk.DFA) for m in run.model.modules()):
            raise ValueError(
                "alignment_every: the model has no dk.DFA module, so there is no DFA alignment to "
                "measure (a model without hidden layers, such as FM, trains exactly in every mode)"
            )
        self.run, self.progress, self.alignment_every, self.desc = run, progress, alignment_every, desc
        self.world = world if world is not None and world.size > 1 else None
        self.strategy = strategy if self.world is not None else None
        if self.strategy == "fsdp" and compile:
            raise ValueError(
                "compile with FSDP is not supported by this trainer (untested: FSDP2's hooks under "
                "torch.compile need compiled autograd); use DDP with compile, or FSDP eager"
            )
        if self.strategy == "fsdp" and alignment_every:
            raise ValueError(
                "alignment_every measures on the whole model: not with FSDP's sharded parameters "
                "(use DDP, or one process)"
            )
        self.main = self.world is None or self.world.main
        self.total = run.epochs * run.steps_per_epoch
        # the training state (state_dict)
        self.step = 0
        self.history: list[dict] = []
        self.epoch_losses: list[float] = []  # the current round's step losses
        self.measurements: list[dict] = []
        self.best: float | None = None
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.since_best = 0
        self.stopped = "budget"
        self.done = False
        self.elapsed = 0.0  # seconds trained before this session
        self.resumed_at: list[int] = []  # steps at which sessions were resumed
        self._loss = self._setup(compile)

    # ------------------------------------------------------------ setup
    def _setup(self, compile) -> Callable[[Any], torch.Tensor]:
        """The function computing a (rank's) batch loss: the run's own, or through the DDP/FSDP
        wrapper and/or torch.compile."""
        run = self.run
        if self.world is not None:
            from . import distributed

            if run.shard is None:
                raise ValueError(
                    "this task's batches cannot be split across processes (its recipe defines no "
                    "shard); train it in one process"
                )
            if not isinstance(run.batches, FullBatch):  # ranks see different rows: their own dropout masks
                distributed.seed_per_rank(self.world)
            self.wrapper = distributed.wrap(run, self.world, self.strategy)
            loss = self.wrapper
        else:
            self.wrapper = None
            model, loss_fn = run.model, run.loss
            loss = lambda batch: loss_fn(model, batch)  # noqa: E731 - the run's loss, unchanged
        self._opt_step = run.optimizer.step
        if compile:
            self._prime()
            backend = "inductor" if compile is True else compile
            loss = compile_loss(loss, backend)
            self._opt_step = compile_optimizer_step(run.optimizer, backend)
        return loss

    def _prime(self) -> None:
        """One eager forward (eval mode, no grad, RNG and batch stream restored) so the model's
        lazily fixed state (the DFA modules' widths, PyG's cached graph normalisation) exists
        before torch.compile traces: the first compiled step is then not recompiled at the second."""
        run = self.run
        position = run.batches.state_dict()
        batch = next(run.batches)
        run.batches.load_state_dict(position)
        if self.world is not None:
            batch = run.shard(batch, self.world.rank, self.world.size)[0]
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            run.model.eval()
            run.loss(run.model, batch)
        run.model.train()

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The complete training state (collective in a distributed run: call it on every rank;
        the RNG states of every rank are gathered)."""
        from . import distributed

        run = self.run
        rng = rng_state()
        return {
            "step": self.step,
            "history": copy.deepcopy(self.history),
            "epoch_losses": list(self.epoch_losses),
            "measurements": copy.deepcopy(self.measurements),
            "best": self.best,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
            "stopped": self.stopped,
            "done": self.done,
            "elapsed": self.elapsed + self._session_seconds(),
            "resumed_at": list(self.resumed_at),
            "model": distributed.model_state(self),
            "best_model": self.best_state,
            "optimizer": distributed.optimizer_state(self),
            "scheduler": None if run.scheduler is None else copy.deepcopy(run.scheduler.state_dict()),
            "plateau": None if run.plateau is None else copy.deepcopy(run.plateau.state_dict()),
            "batches": copy.deepcopy(run.batches.state_dict()),
            "rng": distributed.gather(self.world, rng),  # one entry per rank
            # brsf's draw counters: a plain attribute of each feedback layer, outside the model's state_dict
            # (whose keys stay the original model's), yet the next step's |R_t| depends on it
            "feedback_draws": [m.draws for m in run.model.modules() if isinstance(m, FeedbackLayer)],
        }

    def load_state_dict(self, state: dict) -> None:
        from . import distributed

        run = self.run
        distributed.load_model_state(self, state["model"])
        distributed.load_optimizer_state(self, state["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(state["scheduler"])
        if run.plateau is not None:
            run.plateau.load_state_dict(state["plateau"])
        run.batches.load_state_dict(state["batches"])
        rank = 0 if self.world is None else self.world.rank
        set_rng_state(state["rng"][rank])
        self.step, self.history = state["step"], copy.deepcopy(state["history"])
        self.epoch_losses, self.measurements = list(state["epoch_losses"]), copy.deepcopy(state["measurements"])
        self.best, self.best_epoch, self.best_state = state["best"], state["best_epoch"], state["best_model"]
        self.since_best, self.stopped, self.done = state["since_best"], state["stopped"], state["done"]
        self.elapsed, self.resumed_at = state["elapsed"], [*state["resumed_at"], state["step"]]
        layers = [m for m in run.model.modules() if isinstance(m, FeedbackLayer)]
        for layer, draws in zip(layers, state.get("feedback_draws") or [0] * len(layers)):
            layer.draws = draws

    def _session_seconds(self) -> float:
        start = getattr(self, "_start", None)
        return 0.0 if start is None else time.perf_counter() - start

    # ------------------------------------------------------------ the loop
    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> Fit:
        """Train to the end of the run (from wherever the state is) and return the result; the
        model ends with the selected weights. ``on_step(trainer)`` runs after every step (it may
        save a checkpoint, or raise :class:`Stopped` to end the session)."""
        from tqdm.auto import tqdm

        run = self.run
        self._start = time.perf_counter() - self.elapsed
        self.elapsed = 0.0
        with tqdm(
            total=self.total, initial=self.step, disable=not (self.progress and self.main), leave=False, desc=self.desc
        ) as bar:
            training = False
            while not self.done:
                if len(self.epoch_losses) < run.steps_per_epoch:
                    if not training:
                        run.model.train()
                        training = True
                    self._train_step()
                    bar.update()
                    bar.set_postfix(epoch=len(self.history) + 1, loss=f"{self.epoch_losses[-1]:.4f}")
                    if on_step is not None:
                        on_step(self)
                else:
                    self._end_epoch()
                    training = False
        return self._finish()

    def _train_step(self) -> None:
        run = self.run
        batch = next(run.batches)
        share = 1.0
        if self.world is not None:
            batch, share = run.shard(batch, self.world.rank, self.world.size)
        loss = self._loss(batch)
        run.optimizer.zero_grad(set_to_none=True)
        if self.world is None:
            loss.backward()
        else:  # DDP and FSDP average the ranks' gradients: each rank weighs its loss by its share
            (loss * (share * self.world.size)).backward()
        if run.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.clip_grad)
        self._opt_step()
        if run.scheduler is not None:
            run.scheduler.step()
        self.step += 1
        if self.world is None:
            self.epoch_losses.append(loss.item())
        else:  # the loss of the whole (global) batch
            from . import distributed

            self.epoch_losses.append(distributed.all_reduce_sum(loss.detach() * share).item())
        if self.alignment_every and (self.step % self.alignment_every == 0 or self.step == self.total):
            self._measure(len(self.history) + 1)

    def _evaluate(self, split: str) -> dict:
        from . import distributed

        return distributed.evaluate(self, split)

    def _end_epoch(self) -> None:
        run, model = self.run, self.run.model
        epoch = len(self.history) + 1
        metrics = self._evaluate("val")
        value = metrics[run.select]
        if run.plateau is not None:
            run.plateau.step(value)
        row = {
            "epoch": epoch,
            "step": self.step,
            "train_loss": sum(self.epoch_losses) / len(self.epoch_losses),
            **{f"val_{k}": v for k, v in metrics.items()},
            "lr": run.optimizer.param_groups[0]["lr"],
            "seconds": round(self._session_seconds(), 2),
        }
        if isinstance(row["lr"], torch.Tensor):  # a compiled optimizer's tensor learning rate
            row["lr"] = row["lr"].item()
        self.history.append(row)
        self.epoch_losses = []
        if _better(value, self.best, run.higher_is_better):
            self.best, self.best_epoch, self.since_best = value, epoch, 0
            if self.strategy == "fsdp":
                from . import distributed

                self.best_state = distributed.full_model_state(run.model)
            else:
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.since_best += 1
        if run.patience is not None and self.since_best >= run.patience and len(self.history) >= run.min_epochs:
            self.stopped, self.done = "patience", True
        elif len(self.history) == run.epochs:
            self.done = True

    def _finish(self) -> Fit:
        from . import distributed

        if self.alignment_every and (not self.measurements or self.measurements[-1]["step"] != self.step):
            self._measure(len(self.history))  # the last step, when stopped early
        if self.best_state is not None:
            distributed.load_model_state(self, self.best_state)
        test = self._evaluate("test")
        history = self.history
        val = {k: v for k, v in history[self.best_epoch - 1].items() if k.startswith("val_")} if self.best_epoch else {}
        final = {
            **{f"test_{k}": v for k, v in test.items()},
            **val,
            "best_epoch": self.best_epoch,
            "epochs_run": len(history),
            "steps_run": self.step,
            "stopped": self.stopped,
            # the budget ended while the validation metric was still improving
            "still_improving_at_budget": self.stopped == "budget" and self.best_epoch == len(history),
            "train_seconds": round(self._session_seconds(), 1),
        }
        return Fit(history, final, self.measurements)

    def _measure(self, epoch: int) -> None:
        if not self.main:  # measured on the first rank (the same model and probe batch everywhere)
            return
        import dfa_kernels as dk

        run = self.run
        # the method's own signal (a direct method's at its points, a layer-wise one's at its layers);
        # DFA's for the baselines (bp, shallow: their points get no projection)
        mode = next((m.mode for m in run.model.modules() if isinstance(m, dk.DFA)), "dfa")
        mode = mode if mode in dk.methods.DIRECT + dk.methods.LAYERWISE else "dfa"
        self.measurements.append(
            {"step": self.step, "epoch": epoch, **dk.alignment(run.model, run.loss, run.probe, mode=mode)}
        )


def compile_loss(loss: Callable, backend="inductor") -> Callable:
    """A loss function (the model's forward inside) under torch.compile; AOTAutograd compiles the
    matching backward, DFA's projection included."""
    # the graph models draw dropout masks over the features' non-zeros and their losses read
    # boolean node masks: data-dependent shapes, traced instead of breaking the graph
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(loss, backend=backend)


def compile_optimizer_step(optimizer: torch.optim.Optimizer, backend="inductor") -> Callable[[], None]:
    """``optimizer.step`` under torch.compile. The learning rates become 0-dim tensors first (the
    schedulers then fill them in place), so a changing rate does not recompile the step."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)  # the float, exactly

    @torch.compile(backend=backend)
    def step():
        optimizer.step()

    return step


def fit(run: Run, progress: bool = True, alignment_every: int | None = None, desc: str = "train") -> Fit:
    """Train `run` in one go (see :class:`Trainer`); the model ends with the selected weights."""
    return Trainer(run, progress=progress, alignment_every=alignment_every, desc=desc).fit()
