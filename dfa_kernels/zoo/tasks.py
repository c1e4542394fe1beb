"""The zoo's task registry: what `dfa-kernels train TASK` and `dfa-kernels compare TASK` run.

A recipe module (``dfa_kernels/recipes/<family>.py``) registers one :class:`Task` per trainable
task at import. The CLI owns progress-independent chores (metrics.json, plots, tables); a task's
``run`` owns the data, the model and the training loop, and reports per-epoch metrics.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Callable

MODES = ("bp", "dfa", "shallow")
RECIPE_MODULES = ("graph", "recsys", "transformer", "nerf")


@dataclasses.dataclass
class TrainConfig:
    task: str
    mode: str = "dfa"                 # "bp" | "dfa" | "shallow"
    placement: str = "macro"          # Transformer only: "macro" | "micro" | "linear"
    preset: str = "cpu"               # "cpu": minutes on a 2-core CPU; "full": the paper's sizes
    device: str = "cpu"
    epochs: int | None = None         # None: the preset's
    lr: float | None = None           # None: the mode's tuned value
    seed: int = 0
    data: str | None = None           # a user's own files in the paper's format (see each task)
    out: Path | None = None           # where a task may save extra artefacts (images, ...)
    progress: bool = True             # show a tqdm bar


@dataclasses.dataclass
class TrainResult:
    history: list[dict]               # one dict of metrics per epoch (must include "epoch")
    final: dict                       # test metrics of the final (or best-on-validation) model
    backend: str                      # projection backend used by DFA ("-" for bp)
    config: dict = dataclasses.field(default_factory=dict)   # the resolved hyper-parameters
    artefacts: list[str] = dataclasses.field(default_factory=list)  # files written under out


@dataclasses.dataclass
class Task:
    name: str                         # e.g. "gcn-cora"
    family: str                       # "graph" | "recsys" | "transformer" | "nerf"
    description: str
    metric: str                       # headline metric in `final`, e.g. "test_acc"
    higher_is_better: bool
    run: Callable[[TrainConfig], TrainResult]
    paper: dict[str, float] = dataclasses.field(default_factory=dict)  # mode -> paper's number


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
