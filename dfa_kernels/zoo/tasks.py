"""The zoo's task registry: what `dfa-kernels train TASK` and `dfa-kernels compare TASK` run.

A recipe module (``dfa_kernels/zoo/recipes/<family>.py``) registers one :class:`Task` per trainable
task at import. A task's ``build`` turns a :class:`TrainConfig` into a :class:`~.trainer.Run` (data,
model, optimizer, loss, evaluation); the shared loop (:mod:`.trainer`) trains it and
:mod:`.training` writes the results (metrics.json, plots, comparison tables).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import Run

from .. import methods

MODES = methods.MODES  # every method of the family (dfa_kernels.methods)
BASE_MODES = ("bp", "dfa", "shallow")  # what every task trains, and what compare/tune run by default
RECIPE_MODULES = ("graph", "recsys", "transformer", "nerf", "image")


def only_base_modes(why: str) -> dict[str, str]:
    """Task.unsupported for a recipe that trains bp, dfa and shallow only, and why."""
    return {m: why for m in MODES if m not in BASE_MODES}


def tuned_as(mode: str) -> str:
    """The mode whose tuned hyper-parameters and grid a mode starts from: a family method that a
    recipe has not tuned for itself starts from dfa's (the same grid, so the same tuning budget)."""
    return mode if mode in BASE_MODES else "dfa"


@dataclasses.dataclass
class TrainConfig:
    task: str
    mode: str = "dfa"  # one of MODES (the task's Task.modes)
    placement: str = "macro"  # Transformer only: "macro" | "micro" | "linear"
    preset: str = "cpu"  # "cpu": minutes on a 2-core CPU; "full": the paper's sizes
    device: str = "cpu"
    epochs: int | None = None  # None: the preset's (the most evaluation rounds)
    lr: float | None = None  # None: the mode's tuned value
    seed: int = 0
    data: str | None = None  # another dataset, or a user's own files (see each task)
    out: Path | None = None  # where a task may save extra artefacts (images, ...)
    progress: bool = True  # show a tqdm bar
    feedback: str = "paper"  # "paper": one shared B (TinyDFA's); "ours": one B per point
    alignment_every: int | None = None  # measure alignment every N steps (and at the last one)
    hp: dict | None = None  # hyper-parameter overrides (a tuning candidate, see Task.grid)
    compile: bool = False  # the training step (loss forward/backward, optimizer) under torch.compile
    fsdp: bool = False  # distributed runs: FSDP2 (fully_shard) instead of DDP


FEEDBACK = {  # TrainConfig.feedback -> the DFA modules' layout (scale "auto" follows it)
    "paper": "shared",  # TinyDFA: point l reads the first d_l columns of one B, scale 1/sqrt(max d)
    "ours": "independent",  # dk.DFA's default: a B_l per point, scale 1/sqrt(d_l)
}


@dataclasses.dataclass
class TrainResult:
    history: list[dict]  # one dict of metrics per evaluation round (includes "epoch")
    final: dict  # val/test metrics of the selected (best-validation) model
    backend: str  # projection backend used by DFA ("-" for bp)
    config: dict = dataclasses.field(default_factory=dict)  # the resolved hyper-parameters
    artefacts: list[str] = dataclasses.field(default_factory=list)  # files written under out
    alignment: list[dict] = dataclasses.field(default_factory=list)  # measurements along training
    model: object = dataclasses.field(default=None, repr=False)  # the selected model (not saved)
    select: str = ""  # the validation metric that selected the model, e.g. "val_acc"
    resumed_at: list[int] = dataclasses.field(default_factory=list)  # steps where sessions resumed


@dataclasses.dataclass
class Task:
    name: str  # e.g. "gcn-cora"
    family: str  # "graph" | "recsys" | "transformer" | "nerf"
    description: str
    metric: str  # headline metric in `final`, e.g. "test_acc"
    higher_is_better: bool
    build: Callable[[TrainConfig], Run]
    paper: dict[str, float] = dataclasses.field(default_factory=dict)  # mode -> paper's number
    paper_setting: str = ""  # what the paper's number measures (dataset, split, metric)
    # whether a run of this config measures what the paper's number does (same data, split, metric)
    comparable: Callable[[TrainConfig], bool] = lambda config: False
    # the tuning candidates of a config's mode (hyper-parameter overrides, TrainConfig.hp; the same
    # number for every mode) and the recipe's current choice among them (``dfa-kernels tune``)
    grid: Callable[[TrainConfig], list[dict]] | None = None
    tuned: Callable[[TrainConfig], dict] | None = None
    # (label -> a compare report's run with its artefacts, path): a picture of a comparison (NeRF's renders)
    figure: Callable[[dict, Path], Path] | None = None
    # mode -> why this task cannot train it (e.g. no class targets for drtp); every other mode trains
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)
    # the presets (TrainConfig.preset) the recipe defines: a recipe's own table of them (its keys),
    # so that a preset added to the table is known
    presets: Collection[str] = ("cpu", "full")

    @property
    def modes(self) -> tuple[str, ...]:
        order = BASE_MODES + tuple(m for m in MODES if m not in BASE_MODES)
        return tuple(m for m in order if m not in self.unsupported)

    def check_mode(self, mode: str) -> None:
        methods.method(mode)
        if mode in self.unsupported:
            raise ValueError(f"task {self.name!r} does not train mode {mode!r}: {self.unsupported[mode]}")

    def check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise ValueError(
                f"preset must be one of {', '.join(map(repr, self.presets))} for task {self.name!r}; got {preset!r}"
            )


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    build = task.build

    def build_for_mode(config: TrainConfig) -> Run:  # every caller gets the mode's layers and targets
        from . import family

        task.check_mode(config.mode)
        task.check_preset(config.preset)
        return family.prepare(build(config), config.mode)

    task.build = build_for_mode
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
    projection runs (modes bp, shallow and the layer-wise ones, or no DFA module)."""
    import dfa_kernels as dk

    dfa = next((m for m in model.modules() if isinstance(m, dk.DFA)), None)
    if dfa is None or dfa.mode not in methods.DIRECT:
        return "-"
    return dfa.resolved_backend(device)
