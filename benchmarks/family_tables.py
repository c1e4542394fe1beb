"""The random-feedback family's zoo tables, from the committed comparisons (issue 22).

``python benchmarks/family_tables.py`` reads ``benchmarks/results/zoo/family/<task>.<part>.json``
(each written by ``dfa-kernels compare TASK --modes ... --seeds 0 1 2 --alignment-every N --json
...``; a task's parts are merged, each keeping its own command and SHA) and the tuning report beside
them (``<task>.tuning.json`` or its parts ``<task>.PART.tuning.json``, from ``dfa-kernels tune``), and
prints one markdown table per task:
per method, the test metric of the model selected on validation (mean ± std over seeds), the
learning rate it trained with, and the alignment of the method's own signal with backprop at the end
of training (``dk.alignment``: the cosine of the network's update with BP's gradient, and of the
deepest point's signal, mean over seeds; for a layer-wise method the signal is the gradient at the
output of its first feedback layer; "—" for the baselines). Published numbers stand beside ours only
where the same metric, data and network exist: none does for these rows (the papers' CNN numbers are
CIFAR-10 / ImageNet, biotorch's Benchmarks.md and the DKP README included), so the column says "not
comparable", except the DFA paper's Cora GCN numbers for bp and dfa.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks" / "results" / "zoo" / "family"
sys.path.insert(0, str(ROOT))

from dfa_kernels import methods  # noqa: E402


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    std = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{std}"


def table(report: dict, tuning: dict | None) -> list[str]:
    metric = report["metric"]
    head = ["method", "family", f"{metric} (mean ± std)", "n", "lr", "update cos", "deepest signal cos", "published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, summary in report["summary"].items():
        runs = [r for r in report["runs"] if r["variant"] == variant]
        mode = runs[0]["mode"]
        entry = methods.METHODS[mode].entry or "baseline"
        lrs = sorted({r["config"].get("lr") for r in runs})
        last = [r["alignment"][-1] if r["alignment"] else None for r in runs]
        # only what was measured in the method's own mode (runs before layer-wise alignment existed
        # measured DFA's points in the layer-wise modes)
        if all(a is not None and a["compared"] == f"mode {mode!r} against backprop" for a in last):
            update = _mean_std([a["network"]["update_cos"] for a in last])
            signal = _mean_std([a["deepest"]["signal_cos_mean"] for a in last])
        else:
            update = signal = "—"
        if report["paper_comparable"]:
            published = "none published" if summary["paper"] is None else f"{summary['paper']:.3f}"
        else:
            published = "not comparable"
        lines.append(
            f"| {mode} | {entry} | {_mean_std(summary_values(report, variant, metric))} | {len(runs)} | "
            f"{', '.join(f'{lr:g}' for lr in lrs)} | {update} | {signal} | {published} |"
        )
    tuned = (
        ""
        if tuning is None
        else (f" Learning rates tuned on validation (seed 0), the same grid for every method: {tuning_grid(tuning)}.")
    )
    lines.append("")
    made = "; ".join(f"`{p['command']}` (git {p['git_sha'][:10]})" for p in report["provenances"])
    lines.append(
        f"{report['task']}, {report['preset']} preset, seeds {sorted({r['seed'] for r in report['runs']})}: "
        f"{made}.{tuned}"
    )
    return lines


def summary_values(report: dict, variant: str, metric: str) -> list[float]:
    return [r["final"].get(metric) for r in report["runs"] if r["variant"] == variant]


def tuning_grid(tuning: dict) -> str:
    first = next(iter(tuning["modes"].values()))
    return ", ".join(f"{t['hp']}" for t in first["trials"])


def merged(paths: list[Path]) -> dict:
    """One report of a task's parts: their runs and summaries together, every part's provenance."""
    parts = [json.loads(p.read_text()) for p in paths]
    report = dict(parts[0])
    report["summary"] = {k: v for part in parts for k, v in part["summary"].items()}
    report["runs"] = [r for part in parts for r in part["runs"]]
    report["provenances"] = [part["provenance"] for part in parts]
    return report


def main() -> None:
    tasks: dict[str, list[Path]] = {}
    for path in sorted(FOLDER.glob("*.json")):
        if not path.name.endswith(".tuning.json"):
            tasks.setdefault(path.name.split(".")[0], []).append(path)
    for task, paths in tasks.items():
        report = merged(paths)
        # a task's tuning may come in parts too (<task>.tuning.json, <task>.PART.tuning.json), one per command
        parts = [json.loads(p.read_text()) for p in sorted(FOLDER.glob(f"{task}.*tuning.json"))]
        tuning = dict(parts[0], modes={k: v for p in parts for k, v in p["modes"].items()}) if parts else None
        print(f"**{task}**\n")
        print("\n".join(table(report, tuning)) + "\n")


if __name__ == "__main__":
    main()
