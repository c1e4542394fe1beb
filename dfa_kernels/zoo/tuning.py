"""``dfa-kernels tune TASK``: the same tuning budget for every mode, chosen on validation data only.

Each mode trains once per candidate of the task's grid (:attr:`Task.grid`: hyper-parameter
overrides, the same number of candidates for bp, dfa and shallow), with seed 0 and the task's usual
stopping rule; the candidate with the best validation metric (the one the trainer selects models
by) wins. ``tuning.json`` keeps every trial, the winner of each mode and whether it is the value the
recipe's table holds, so the tables in the recipes can be checked against the runs that chose them.

Equal tuning is the rule: every mode (and Transformer placement) is tuned on the same values of
every hyper-parameter any of them tunes. A recipe that departs from it declares each departure, with
its reason, in its ``TUNING_DEPARTURES`` (hyper-parameter -> reason); :func:`departures` collects
them with the grids they concern, tests/test_fairness.py checks that the declarations and the grids
agree, and the README's departures list prints :func:`departures_markdown`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path

from ..provenance import provenance
from .tasks import BASE_MODES, Task, TrainConfig, all_tasks
from .training import train, variant_name


def tune(task: Task, base: TrainConfig, modes=BASE_MODES, json_path: Path | None = None, placements=None) -> dict:
    """Tune every mode (and, for a Transformer's DFA, every placement in `placements`)."""
    if task.grid is None:
        raise ValueError(f"task {task.name!r} defines no tuning grid")
    for mode in modes:
        task.check_mode(mode)
    out = Path(base.out or "runs") / task.name
    report = {
        "task": task.name,
        "preset": base.preset,
        "data": base.data,
        "seed": base.seed,
        "modes": {},
        "rule": "best validation metric of one run (seed as given) per candidate; the same number of "
        "candidates for every mode",
        "provenance": provenance(),
    }
    configs = [
        dataclasses.replace(base, mode=mode, placement=placement)
        for mode in modes
        for placement in (
            placements or [base.placement] if mode == "dfa" and task.family == "transformer" else [base.placement]
        )
    ]
    for config in configs:
        trials = []
        for candidate in task.grid(config):
            result = train(task, dataclasses.replace(config, hp=dict(candidate), out=out / "tuning"))
            value = result.final.get(result.select, math.nan)
            trials.append(
                {
                    "hp": candidate,
                    result.select: value,
                    "best_epoch": result.final.get("best_epoch"),
                    "stopped": result.final.get("stopped"),
                }
            )
            print(f"{task.name} [{variant_name(task, config)}] {candidate}: {result.select} = {value:.4f}", flush=True)
        sign = 1 if task.higher_is_better else -1  # the selection metric goes the task metric's way
        best = max(trials, key=lambda t: -math.inf if math.isnan(t[result.select]) else sign * t[result.select])
        current = task.tuned(config) if task.tuned is not None else None
        report["modes"][variant_name(task, config)] = {
            "selected_by": result.select,
            "trials": trials,
            "best": best["hp"],
            "recipe": current,
            "recipe_matches": current == best["hp"],
        }
    path = out / "tuning.json"
    for p in {path, *([Path(json_path)] if json_path else [])}:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=1) + "\n")
    for variant, r in report["modes"].items():
        print(f"{variant:<16} best {r['best']}  recipe {r['recipe']}  {'ok' if r['recipe_matches'] else 'DIFFERS'}")
    return report


def variants(task: Task) -> list[TrainConfig]:
    """A config per mode, and per placement for a Transformer's DFA: what is tuned separately."""
    placements = ("macro", "micro", "linear") if task.family == "transformer" else ("macro",)
    return [
        TrainConfig(task=task.name, mode=mode, placement=placement)
        for mode in task.modes
        for placement in (placements if mode == "dfa" else ("macro",))
    ]


def grid_values(task: Task) -> dict[str, dict[str, tuple]]:
    """hyper-parameter -> variant name -> the values its grid tries (sorted)."""
    out: dict[str, dict[str, tuple]] = {}
    for config in variants(task):
        candidates = task.grid(config)
        for key in sorted({k for c in candidates for k in c}):
            out.setdefault(key, {})[variant_name(task, config)] = tuple(
                sorted({c.get(key) for c in candidates}, key=repr)
            )
    return out


def departures() -> list[dict]:
    """Every hyper-parameter whose grid is not the same for every variant of a task: the tasks, each
    variant's values, and the reason its recipe declares (None where it declares none)."""
    rows: dict[tuple, dict] = {}
    for name, task in sorted(all_tasks().items()):
        if task.grid is None:
            continue
        declared = getattr(importlib.import_module(f"dfa_kernels.zoo.recipes.{task.family}"), "TUNING_DEPARTURES", {})
        for key, per_variant in grid_values(task).items():
            if len(set(per_variant.values())) > 1:
                row = rows.setdefault(
                    (task.family, key, repr(per_variant)),
                    {
                        "recipe": task.family,
                        "tasks": [],
                        "hyper_parameter": key,
                        "grids": per_variant,
                        "reason": declared.get(key),
                    },
                )
                row["tasks"].append(name)
    return list(rows.values())


def departures_markdown() -> str:
    """The README's list of departures from equal tuning (one line each)."""
    lines = []
    for d in departures():
        groups: dict[tuple, list[str]] = {}
        for variant, values in d["grids"].items():
            groups.setdefault(values, []).append(variant)
        grids = "; ".join(f"{', '.join(v)}: {' / '.join(f'{x:g}' for x in values)}" for values, v in groups.items())
        lines.append(f"- `{', '.join(d['tasks'])}`, `{d['hyper_parameter']}` ({grids}): {d['reason']}")
    return "\n".join(lines)
