"""The zoo's task registry: what `dfa-kernels train TASK` and `dfa-kernels compare TASK` run.

A recipe module (``dfa_kernels/zoo/recipes/<family>.py``) registers one :class:`Task` per trainable
task at import. A task's ``build`` turns a :class:`TrainConfig` into a :class:`~.trainer.Run` (data,
model, optimizer, loss, evaluation); the shared loop (:mod:`.trainer`) trains it and
:mod:`.training` writes the results (metrics.json, plots, comparison tables).
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .trainer import Run

MODES = ("bp", "dfa", "shallow")
RECIPE_MODULES = ("graph", "recsys", "transformer", "nerf")


@dataclasses.dataclass
class TrainConfig:
    task: str
    mode: str = "dfa"                 # "bp" | "dfa" | "shallow"
    placement: str = "macro"          # Transformer only: "macro" | "micro" | "linear"
    preset: str = "cpu"               # "cpu": minutes on a 2-core CPU; "full": the paper's sizes
    device: str = "cpu"
    epochs: int | None = None         # None: the preset's (the most evaluation rounds)
    lr: float | None = None           # None: the mode's tuned value
    seed: int = 0
    data: str | None = None           # another dataset, or a user's own files (see each task)
    out: Path | None = None           # where a task may save extra artefacts (images, ...)
    progress: bool = True             # show a tqdm bar
    feedback: str = "paper"           # "paper": one shared B (TinyDFA's); "ours": one B per point
    alignment_every: int | None = None  # measure alignment every N steps (and at the last one)
    hp: dict | None = None            # hyper-parameter overrides (a tuning candidate, see Task.grid)
    compile: bool = False             # the training step (loss forward/backward, optimizer) under torch.compile
    fsdp: bool = False                # distributed runs: FSDP2 (fully_shard) instead of DDP


FEEDBACK = {  # TrainConfig.feedback -> the DFA modules' layout (scale "auto" follows it)
    "paper": "shared",       # TinyDFA: point l reads the first d_l columns of one B, scale 1/sqrt(max d)
    "ours": "independent",   # dk.DFA's default: a B_l per point, scale 1/sqrt(d_l)
}


@dataclasses.dataclass
class TrainResult:
    history: list[dict]               # one dict of metrics per evaluation round (includes "epoch")
    final: dict                       # val/test metrics of the selected (best-validation) model
    backend: str                      # projection backend used by DFA ("-" for bp)
    config: dict = dataclasses.field(default_factory=dict)   # the resolved hyper-parameters
    artefacts: list[str] = dataclasses.field(default_factory=list)  # files written under out
    alignment: list[dict] = dataclasses.field(default_factory=list)  # measurements along training
    model: object = dataclasses.field(default=None, repr=False)      # the selected model (not saved)
    select: str = ""                  # the validation metric that selected the model, e.g. "val_acc"
    resumed_at: list[int] = dataclasses.field(default_factory=list)  # steps where sessions resumed


@dataclasses.dataclass
class Task:
    name: str                         # e.g. "gcn-cora"
    family: str                       # "graph" | "recsys" | "transformer" | "nerf"
    description: str
    metric: str                       # headline metric in `final`, e.g. "test_acc"
    higher_is_better: bool
    build: Callable[[TrainConfig], "Run"]
    paper: dict[str, float] = dataclasses.field(default_factory=dict)  # mode -> paper's number
    paper_setting: str = ""           # what the paper's number measures (dataset, split, metric)
    # whether a run of this config measures what the paper's number does (same data, split, metric)
    comparable: Callable[[TrainConfig], bool] = lambda config: False
    # the tuning candidates of a config's mode (hyper-parameter overrides, TrainConfig.hp; the same
    # number for every mode) and the recipe's current choice among them (``dfa-kernels tune``)
    grid: Callable[[TrainConfig], list[dict]] | None = None
    tuned: Callable[[TrainConfig], dict] | None = None
    # (label -> a compare report's run with its artefacts, path): a picture of a comparison (NeRF's renders)
    figure: Callable[[dict, Path], Path] | None = None


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def _load_recipes() -> None:
    for name in RECIPE_MODULES:
        try:
            importlib.import_module(f"dfa_kernels.zoo.recipes.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"dfa_kernels.zoo.recipes.{name}":
                raise


def all_tasks() -> dict[str, Task]:
    _load_recipes()
    return dict(_TASKS)


def get(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def set_feedback(model, feedback: str) -> None:
    """Give every DFA module of a freshly built model the feedback layout of `feedback` (FEEDBACK)."""
    import dfa_kernels as dk
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback must be one of {', '.join(map(repr, FEEDBACK))}; got {feedback!r}")
    for module in model.modules():
        if isinstance(module, dk.DFA):
            if module.spec is not None:
                raise RuntimeError("set_feedback: the feedback matrix is already fixed (a forward pass ran)")
            module.layout = FEEDBACK[feedback]


def dfa_backend(model, device) -> str:
    """The projection backend the model's (first) DFA module runs on `device`; "-" when no
    projection runs (modes bp and shallow, or no DFA module)."""
    import dfa_kernels as dk
    dfa = next((m for m in model.modules() if isinstance(m, dk.DFA)), None)
    if dfa is None or dfa.mode != "dfa":
        return "-"
    return dfa.resolved_backend(device)
