"""Fairness as a rule: BP, every DFA variant and shallow get the same tuning grids and budgets, in
every zoo recipe and in the scaling study's plan, or the recipe declares the departure with its
reason (``TUNING_DEPARTURES``) and the docs' departures list (docs/zoo.md) prints it."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from dfa_kernels.studies import scaling
from dfa_kernels.zoo import tasks, tuning

ZOO_PAGE = Path(__file__).resolve().parents[1] / "docs" / "zoo.md"
TUNED = [name for name, task in sorted(tasks.all_tasks().items()) if task.grid is not None]
# what a recipe's data and models need (a task whose package is missing is skipped)
NEEDS = {"graph": "torch_geometric", "recsys": "sklearn", "nerf": "pybullet"}
# resolved hyper-parameters that name the variant rather than configure it
IDENTITY = {"mode", "placement", "feedback_points", "note", "layers_converted", "feedback_optimizer"}


def recipe(task) -> object:
    return importlib.import_module(f"dfa_kernels.zoo.recipes.{task.family}")


@pytest.mark.parametrize("name", TUNED)
def test_every_grid_departure_is_declared_and_every_declaration_departs(name):
    """The "cpu" preset's grids (the ones `dfa-kernels tune` runs): for every hyper-parameter any
    variant tunes, the same values for every variant, or a declared reason."""
    task = tasks.get(name)
    declared = getattr(recipe(task), "TUNING_DEPARTURES", {})
    values = tuning.grid_values(task)
    departing = {key for key, per_variant in values.items() if len(set(per_variant.values())) > 1}
    for key in departing:
        assert declared.get(key), (
            f"{name}: the {key!r} grids differ between variants {values[key]} and "
            f"{recipe(task).__name__}.TUNING_DEPARTURES gives no reason"
        )
    # a declaration must concern a departure of at least one of the recipe's tasks
    family = [t for t in TUNED if tasks.get(t).family == task.family]
    for key in declared:
        assert any(len(set(tuning.grid_values(tasks.get(t)).get(key, {}).values())) > 1 for t in family), (
            f"{recipe(task).__name__}.TUNING_DEPARTURES declares {key!r}, whose grids no longer differ"
        )
    sizes = [len(task.grid(config)) for config in tuning.variants(task)]
    assert len(set(sizes)) == 1, (name, sizes)  # the same number of candidates


@pytest.mark.parametrize("name", TUNED)
def test_every_variant_gets_the_same_budget_and_settings(name):
    """Built for every variant (cpu preset, not trained): the same epochs, steps, stopping rule and
    every resolved hyper-parameter, except the tuned ones and those naming the variant."""
    task = tasks.get(name)
    if task.family in NEEDS and importlib.util.find_spec(NEEDS[task.family]) is None:
        pytest.skip(f"{name} needs {NEEDS[task.family]}")
    tuned_keys = set(tuning.grid_values(task))
    seen = {}
    for config in tuning.variants(task):
        config.progress = False
        run = task.build(config)
        seen[config.mode + "-" + config.placement] = {
            "epochs": run.epochs,
            "steps_per_epoch": run.steps_per_epoch,
            "patience": run.patience,
            "min_epochs": run.min_epochs,
            **{k: repr(v) for k, v in run.hyper_parameters.items() if k not in tuned_keys | IDENTITY},
        }
    first, *others = seen.items()
    for variant, settings in others:
        differ = {
            k: (first[1].get(k), settings.get(k))
            for k in set(first[1]) | set(settings)
            if first[1].get(k) != settings.get(k)
        }
        assert not differ, f"{name}: {first[0]} and {variant} differ in {differ}"


def test_the_scaling_plan_tunes_every_method_alike():
    """Every preset: each parameter group is tuned on the same grid by every method that trains it
    (BP's head included), over the same warmups, tuning budgets, budgets and seeds."""
    for name, preset in scaling.PRESETS.items():
        grids = {m: scaling.tuning_grids(preset, m) for m in scaling.METHODS}
        for group in ("body", "head", "warmup"):
            assert len({repr(g[group]) for g in grids.values() if group in g}) == 1, (name, group)
        assert "head" in grids["bp"] and all(
            set(g) == {"body", "head", "warmup"} for m, g in grids.items() if m != "shallow"
        )
        # what the jobs actually try, per size and tuning budget
        tried = {}
        for job in scaling.jobs(preset):
            key = tried.setdefault((job.method, job.size, job.steps, job.stage), set())
            key.add(job.seed if job.stage == "run" else (job.lr, job.warmup))
        for method in scaling.METHODS:
            for size in range(len(preset.sizes)):
                for budget in preset.tune_budgets:
                    first = tried.get((method, size, budget, "body" if "body" in grids[method] else "head"))
                    values = {lr for lr, _ in first}
                    want = preset.lr_grid["body" if "body" in grids[method] else "head"]
                    assert values == set(want), (name, method, size, budget)
                    if "body" in grids[method]:  # the head grid, its middle run in the body stage
                        head = {lr for lr, _ in tried[(method, size, budget, "head")]} | {scaling.head_start(preset)}
                        assert head == set(preset.lr_grid["head"]), (name, method)
        runs = {
            m: sorted((k[1], k[2], tuple(sorted(v))) for k, v in tried.items() if k[0] == m and k[3] == "run")
            for m in scaling.METHODS
        }
        assert all(r == runs["bp"] for r in runs.values()), name


def test_docs_list_every_departure():
    text = ZOO_PAGE.read_text()
    block = re.search(r"<!-- tuning-departures:start -->\n(.*?)\n<!-- tuning-departures:end -->", text, re.S)
    assert block, "docs/zoo.md has no <!-- tuning-departures:start/end --> block"
    assert block.group(1).strip() == tuning.departures_markdown().strip(), (
        "docs/zoo.md's departures list is stale: run python benchmarks/summarize.py --no-plots"
    )
    assert all(d["reason"] for d in tuning.departures())
