"""Bytes a pipeline sends per training step, DFA's schedule against BP's 1F1B, on the zoo's models.

    python benchmarks/pipeline_traffic.py [--stages 2 3] [--microbatches 4]

For each model that the pipeline cuts (the Transformer LM of lm-shakespeare's cpu preset and the
four recommender models at their cpu presets), S gloo processes run two steps of one batch from the
task's own data (its rows cut to a multiple of M, which 1F1B needs) under each schedule and report
what every rank sent (Pipeline.stats: activations forward, activation gradients backward (BP), the
errors e (DFA), shape headers) in the second (torch's stages run an extra forward in their first
to infer shapes). Counting, not timing: the numbers do not depend on the machine.
DFA sends e (rows x the error's width) once to each of the S - 1 other stages; BP sends back a
gradient as large as every activation it sent forward. Writes
benchmarks/results/pipeline/traffic.json (with the git SHA and this command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "pipeline" / "traffic.json"
TASKS = ("lm-shakespeare", "autoint-ml100k", "afn-ml100k", "deepfm-ml100k", "dcn-ml100k")
KINDS = ("activations", "gradients", "errors", "headers")


def one_batch(task_name: str, mode: str, M: int):
    """The task's model (seed 0, cpu preset) and its first training batch as (inputs, targets)."""
    from dfa_kernels.pipeline.train import as_pair
    from dfa_kernels.zoo import tasks

    run = tasks.get(task_name).build(tasks.TrainConfig(task=task_name, mode=mode, progress=False))
    inputs, targets = as_pair(run, next(run.batches))
    rows = targets.shape[0] // M * M
    cut = (lambda t: t[:rows]) if rows != targets.shape[0] else (lambda t: t)
    inputs = tuple(map(cut, inputs)) if isinstance(inputs, (tuple, list)) else cut(inputs)
    return run.model, inputs, cut(targets)


def worker(rank: int, size: int, store: str, M: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=600)
    )
    from dfa_kernels import pipeline as pl

    out = {}
    for task in TASKS:
        out[task] = {}
        for schedule, mode in (("dfa", "dfa"), ("1f1b", "bp")):
            model, inputs, targets = one_batch(task, mode, M)
            example = tuple(t[:1] for t in inputs) if isinstance(inputs, tuple) else inputs[:1]
            try:
                pipe = pl.Pipeline(model, size, M, example, schedule=schedule)
            except ValueError as err:  # fewer cuttable blocks than stages: said in the result
                out[task][schedule] = {"refused": str(err)}
                continue
            for _ in range(2):  # the second step's: torch's stages infer shapes in their first
                pipe.step(inputs, targets)
            stats = pipe.stats
            out[task][schedule] = {k: getattr(stats, f"bytes_{k}") for k in KINDS}
            out[task]["rows"] = int(targets.shape[0])
            out[task]["cuts"] = pipe.cuts
    queue.put((rank, out))
    dist.destroy_process_group()


def measure(size: int, M: int) -> dict:
    from pipeline import run_ranks  # benchmarks/pipeline.py: the gloo processes

    ranks = dict(run_ranks(worker, size, M))
    rows = {}
    for task in TASKS:
        row = {"rows": ranks[0][task].get("rows"), "cuts": ranks[0][task].get("cuts")}
        for schedule in ("dfa", "1f1b"):
            per_rank = [ranks[r][task][schedule] for r in range(size)]
            if "refused" in per_rank[0]:
                row[schedule] = per_rank[0]
                continue
            total = {k: sum(r[k] for r in per_rank) for k in KINDS}
            total["payload"] = sum(total[k] for k in ("activations", "gradients", "errors"))
            row[schedule] = total
        if "payload" in row["dfa"] and "payload" in row["1f1b"]:
            row["dfa_over_bp"] = row["dfa"]["payload"] / row["1f1b"]["payload"]
        rows[task] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from dfa_kernels.provenance import provenance

    result = {
        "microbatches": args.microbatches,
        "by_stages": {str(S): measure(S, args.microbatches) for S in args.stages},
        "command": ["python", "benchmarks/pipeline_traffic.py", *sys.argv[1:]],
        "provenance": provenance(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for S, rows in result["by_stages"].items():
        for task, row in rows.items():
            dfa, bp = row["dfa"], row["1f1b"]
            print(
                f"S={S} {task:<16} rows {row['rows']}: DFA {dfa.get('payload', dfa.get('refused'))} B "
                f"(activations {dfa.get('activations')}, errors {dfa.get('errors')}), 1F1B {bp.get('payload')} B "
                f"(activations {bp.get('activations')}, gradients {bp.get('gradients')}); "
                f"DFA/BP {row.get('dfa_over_bp', float('nan')):.3f}"
            )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
