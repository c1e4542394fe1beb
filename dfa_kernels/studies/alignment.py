"""The alignment study: ``dfa-kernels align TASK`` trains a zoo task (mode dfa unless told
otherwise), measures DFA's alignment with backprop along training (``dk.alignment``, from
:mod:`dfa_kernels.align`) and writes ``alignment.json`` and a plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..align import plot_alignment
from ..provenance import provenance
from ..zoo import tasks
from ..zoo.training import train, variant_name


def run_study(task_name: str, config, measurements: int = 20) -> dict:
    """``dfa-kernels align TASK``: train the task (mode dfa unless told otherwise), measuring every
    total_steps / `measurements` steps and at the last one; writes OUT/TASK/alignment.{json,png}."""
    task = tasks.get(task_name)
    run = task.build(config)
    if config.alignment_every is None:
        config = dataclasses.replace(config, alignment_every=max(1, run.epochs * run.steps_per_epoch // measurements))
    out = Path(config.out or "runs") / task.name
    out.mkdir(parents=True, exist_ok=True)
    result = train(task, dataclasses.replace(config, out=out / variant_name(task, config)), run)
    last = result.alignment[-1]
    report = {
        "task": task.name,
        "variant": variant_name(task, config),
        "alignment_every": config.alignment_every,
        "final": {"step": last["step"], "deepest": last["deepest"], "network": last["network"]},
        "metric": {task.metric: result.final.get(task.metric)},
        "config": result.config,
        "measurements": result.alignment,
        "provenance": provenance(),
    }
    (out / "alignment.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_alignment(
        result.alignment,
        out / "alignment.png",
        f"{task.name} ({report['variant']}): DFA signal and update vs BP gradient",
    )
    d, fmt = last["deepest"], (lambda v: "—" if v is None else f"{v:.3f}")
    print(
        f"{task.name}: deepest point ({d['dfa']}#0) signal cosine {fmt(d['signal_cos_mean'])} ± "
        f"{fmt(d['signal_cos_std'])}, update cosine {fmt(d['update_cos'])}; network update cosine "
        f"{fmt(last['network']['update_cos'])} -> {out}/alignment.json, alignment.png"
    )
    return report
