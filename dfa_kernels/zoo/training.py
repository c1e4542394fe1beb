"""Running zoo tasks for the CLI: metrics.json, curve plots, and the BP/DFA/shallow comparison table."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .tasks import MODES, Task, TrainConfig, TrainResult


def _plot_curves(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for h in histories.values() for row in h for k in row if k != "epoch"})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, history in histories.items():
            pts = [(row["epoch"], row[key]) for row in history if key in row]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_task(task: Task, config: TrainConfig) -> TrainResult:
    """Train `task` once; writes OUT/TASK/MODE/{metrics.json, curves.png}."""
    run_dir = Path(config.out or "runs") / task.name / (
        f"{config.mode}-{config.placement}" if task.family == "transformer" else config.mode)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, out=run_dir)
    start = time.perf_counter()
    result = task.run(config)
    wall = time.perf_counter() - start
    metrics = {"task": task.name, "family": task.family, "mode": config.mode,
               "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
                          **result.config},
               "history": result.history, "final": result.final, "backend": result.backend,
               "wall_time_s": wall, "paper": task.paper.get(config.mode), "artefacts": result.artefacts}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot_curves({config.mode: result.history}, run_dir / "curves.png", f"{task.name} ({config.mode})")
    print(f"{task.name} [{config.mode}] {task.metric} = {result.final.get(task.metric)}  "
          f"(backend {result.backend}, {wall:.1f} s) -> {run_dir}/metrics.json")
    return result


def compare_task(task: Task, out: Path, progress: bool = True, **options) -> dict[str, TrainResult]:
    """All three modes with their own tuned hyper-parameters; one table beside the paper's numbers."""
    results = {mode: run_task(task, TrainConfig(task=task.name, mode=mode, out=out, progress=progress, **options))
               for mode in MODES}
    table = [f"{task.name}: {task.metric} ({'higher' if task.higher_is_better else 'lower'} is better)",
             f"{'mode':<9}{'ours':>10}{'paper':>10}  backend"]
    for mode, r in results.items():
        paper = task.paper.get(mode)
        table.append(f"{mode:<9}{r.final.get(task.metric, float('nan')):>10.4f}"
                     f"{paper if paper is not None else float('nan'):>10.4f}  {r.backend}")
    print("\n".join(table))
    compare_dir = Path(out) / task.name
    (compare_dir / "compare.txt").write_text("\n".join(table) + "\n")
    _plot_curves({m: r.history for m, r in results.items()}, compare_dir / "compare.png", task.name)
    return results
