"""Checkpoints of a zoo run: written atomically, loaded with ``weights_only=True``, checked against
the run that loads them.

A checkpoint is one file, ``checkpoint.pt`` in the run's folder: the :class:`~.trainer.Trainer`'s
complete state (model, optimizer, schedulers, the batch stream's position, the RNG states of every
rank, counters, history, the best model so far) and the run's identity (:func:`identity`: task,
config, resolved hyper-parameters, parameter shapes, every DFA module's feedback spec, world
size). The feedback matrices themselves are not stored: they are a function of the spec.

Writing: to a temporary file in the same folder, flushed and fsync'ed, then ``os.replace``d over
the previous checkpoint (and the folder fsync'ed): a crash while saving leaves the previous
checkpoint whole, never a partial one. Loading refuses a checkpoint whose identity differs from
the run's, naming every difference.

The one thing a resumed run may change is its budget, the number of epochs it trains in all (a
finished run can train for longer): the checkpoint also records the budget of the session that
wrote it (``epochs``), and :func:`~.training.train` rebuilds the run with the epochs its first
session was built with, so the learning-rate schedule and the hyper-parameters stay the first
run's (kept, not restarted: past its planned end a schedule goes on as its formula does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed

FORMAT = 1
FILENAME = "checkpoint.pt"
# TrainConfig fields that do not change what is trained (where results go, the progress bar)
NOT_IDENTITY = ("out", "progress")


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from: not a checkpoint, another run's, or a budget the
    run has gone past. The CLI reports it in one line (exit status 2)."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """No checkpoint where --resume points."""


def _plain(value):
    """JSON-like containers (tuples as lists), as they come back from a file."""
    return json.loads(json.dumps(value, default=str))


def feedback_identity(model) -> dict:
    """Per DFA module: what fixes its feedback matrix (and its widths once a forward pass ran)."""
    import dfa_kernels as dk

    found = {}
    for name, m in model.named_modules():
        if isinstance(m, dk.DFA):
            spec = {
                "mode": m.mode,
                "seed": m.seed,
                "distribution": m.distribution,
                "layout": m.layout,
                "density": m.density,
                "scale": m.scale,
            }
            if m.spec is not None:
                spec.update(out_features=m.spec.out_features, widths=list(m.spec.widths))
            found[name or "(root)"] = spec
    return found


def identity(task: str, config, run, world_size: int = 1, strategy: str | None = None) -> dict:
    """What a checkpoint must share with the run that loads it."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IDENTITY}
    model = run.model
    return _plain(
        {
            "task": task,
            "config": fields,
            "hyper_parameters": run.hyper_parameters,
            "model": {
                "class": type(model).__name__,
                "parameters": {k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            },
            "feedback": feedback_identity(model),
            "world_size": world_size,
            "strategy": strategy,
        }
    )


def differences(saved, current, path: str = "") -> list[str]:
    """'path: saved -> current' for every leaf that differs. Feedback widths are compared only when
    both sides know them (a freshly built model has run no forward pass yet)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            where = f"{path}.{key}" if path else str(key)
            if key not in current:
                if not (path.startswith("feedback.") and key in ("widths", "out_features")):
                    out.append(f"{where}: only in the checkpoint")
            elif key not in saved:
                out.append(f"{where}: not in the checkpoint")
            else:
                out += differences(saved[key], current[key], where)
        return out
    return [] if saved == current else [f"{path}: {saved!r} in the checkpoint, {current!r} here"]


def resolve(path) -> Path:
    """The checkpoint file of `path`: the file itself, or FILENAME in a run folder."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, trainer, meta: dict) -> None:
    """Checkpoint `trainer` (collective in a distributed run: every rank calls it, rank 0 writes),
    with its budget (``epochs``: how many epochs this session trains in all)."""
    state = trainer.state_dict()
    if trainer.main:
        atomic_save({"format": FORMAT, "identity": meta, "trainer": state, "epochs": trainer.run.epochs}, path)
    if trainer.world is not None:  # no rank returns (and may resume from it) before the file is whole
        torch.distributed.barrier()


def read(path) -> dict:
    """The checkpoint at `path` (a file or a run folder), as saved ("identity", "trainer", "epochs"),
    with its "file"; not yet checked against a run (:func:`verify`)."""
    file = resolve(path)
    if not file.is_file():
        raise MissingCheckpoint(
            f"no checkpoint at {file} (--resume takes a run folder holding {FILENAME}, or the file)"
        )
    ckpt = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a dfa-kernels checkpoint of format {FORMAT}")
    return {**ckpt, "file": file}


def verify(ckpt: dict, meta: dict) -> dict:
    """The trainer state of `ckpt` (from :func:`read`), after checking that it was written by this
    run (`meta`: :func:`identity` of the freshly built run)."""
    diff = differences(ckpt["identity"], meta)
    if diff:
        shown = "\n  ".join(diff[:12]) + (f"\n  ... and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise CheckpointError(
            f"checkpoint {ckpt['file']} was written by another run; not resuming. Resume with the first run's "
            f"options: only --epochs may differ (it sets how many epochs the run trains in all, so a larger "
            f"--epochs trains it for longer). Differences:\n  {shown}"
        )
    return ckpt["trainer"]


def load(path, meta: dict) -> dict:
    """The trainer state of the checkpoint at `path` (a file or a run folder), after checking that
    it was written by this run (`meta`: :func:`identity` of the freshly built run)."""
    return verify(read(path), meta)


def check_budget(ckpt: dict, epochs: int, steps_per_epoch: int) -> None:
    """A resumed run's budget of `epochs` must not lie behind the checkpoint's step."""
    step = ckpt["trainer"]["step"]
    if step > epochs * steps_per_epoch:
        raise CheckpointError(
            f"checkpoint {ckpt['file']} is at step {step}, past a budget of {epochs} epochs "
            f"({epochs * steps_per_epoch} steps): resume with --epochs "
            f"{-(-step // steps_per_epoch)} or more"
        )


@dataclasses.dataclass
class Checkpoints:
    """Checkpointing of one run: `path` (the file written), every `every` steps; `resume` from a
    checkpoint (file or run folder); end the session after `stop_after` steps in total (a
    checkpoint is written there)."""

    path: Path
    every: int | None = None
    resume: Path | None = None
    stop_after: int | None = None

    def __post_init__(self):
        for name in ("every", "stop_after"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of steps; got {value}")

    def callback(self, meta_of):
        """The trainer's on_step: save every `every` steps and at `stop_after`, then stop there.
        `meta_of()` gives the identity to store (the feedback widths are known after a step)."""
        from .trainer import Stopped

        def on_step(trainer):
            at_stop = self.stop_after is not None and trainer.step >= self.stop_after
            if at_stop or (self.every and trainer.step % self.every == 0):
                save(self.path, trainer, meta_of())
            if at_stop:
                raise Stopped(f"stopped after step {trainer.step}; checkpoint {self.path}")

        return on_step
