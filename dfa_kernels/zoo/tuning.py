"""``dfa-kernels tune TASK``: the same tuning budget for every mode, chosen on validation data only.

Each mode trains once per candidate of the task's grid (:attr:`Task.grid`: hyper-parameter
overrides, the same number of candidates for bp, dfa and shallow), with seed 0 and the task's usual
stopping rule; the candidate with the best validation metric (the one the trainer selects models
by) wins. ``tuning.json`` keeps every trial, the winner of each mode and whether it is the value the
recipe's table holds, so the tables in the recipes can be checked against the runs that chose them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..provenance import provenance
from .tasks import MODES, Task, TrainConfig
from .training import train, variant_name


def tune(task: Task, base: TrainConfig, modes=MODES, json_path: Path | None = None, placements=None) -> dict:
    """Tune every mode (and, for a Transformer's DFA, every placement in `placements`)."""
    if task.grid is None:
        raise ValueError(f"task {task.name!r} defines no tuning grid")
    out = Path(base.out or "runs") / task.name
    report = {"task": task.name, "preset": base.preset, "data": base.data, "seed": base.seed, "modes": {},
              "rule": "best validation metric of one run (seed as given) per candidate; the same number of "
                      "candidates for every mode", "provenance": provenance()}
    configs = [dataclasses.replace(base, mode=mode, placement=placement) for mode in modes
               for placement in (placements or [base.placement] if mode == "dfa" and task.family == "transformer"
                                 else [base.placement])]
    for config in configs:
        trials = []
        for candidate in task.grid(config):
            result = train(task, dataclasses.replace(config, hp=dict(candidate), out=out / "tuning"))
            value = result.final.get(result.select, math.nan)
            trials.append({"hp": candidate, result.select: value, "best_epoch": result.final.get("best_epoch"),
                           "stopped": result.final.get("stopped")})
            print(f"{task.name} [{variant_name(task, config)}] {candidate}: {result.select} = {value:.4f}", flush=True)
        sign = 1 if task.higher_is_better else -1   # the selection metric goes the task metric's way
        best = max(trials, key=lambda t: -math.inf if math.isnan(t[result.select]) else sign * t[result.select])
        current = task.tuned(config) if task.tuned is not None else None
        report["modes"][variant_name(task, config)] = {
            "selected_by": result.select, "trials": trials, "best": best["hp"], "recipe": current,
            "recipe_matches": current == best["hp"]}
    path = out / "tuning.json"
    for p in {path, *([Path(json_path)] if json_path else [])}:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=1) + "\n")
    for variant, r in report["modes"].items():
        print(f"{variant:<16} best {r['best']}  recipe {r['recipe']}  {'ok' if r['recipe_matches'] else 'DIFFERS'}")
    return report
