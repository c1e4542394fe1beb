"""Every zoo table of the README, as `dfa-kernels` commands: tuning, then the comparisons.

    python benchmarks/zoo.py --list                       # the commands, nothing run
    python benchmarks/zoo.py compare --families graph     # run them (skips results already there)
    python benchmarks/zoo.py tune --families recsys
    python benchmarks/summarize.py                        # the README's zoo tables from the JSONs

Each comparison trains bp, dfa (the paper's feedback and ours) and shallow for seeds 0, 1, 2 (one
CPU thread per command; ``--jobs`` runs several at once) with
the recipe's tuned hyper-parameters and stopping rule, and measures DFA's alignment with backprop
at the last training step (``--alignment-every`` larger than any run: one measurement, at the end).
Its report (every run, its config and history, the summary, the git SHA and the exact command)
goes to ``benchmarks/results/zoo/TASK[@DATA].json``; tuning reports to
``benchmarks/results/zoo/tuning/TASK.json``. A command whose JSON exists is skipped unless
``--force``, so the grid can be filled in several sittings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks/results/zoo")  # relative to ROOT: the commands in the JSONs stay portable
SEEDS = ("0", "1", "2")
AT_THE_END = "1000000000"  # --alignment-every: only the measurement at the last step

# (family, task, data) of every README table row; data None: the task's default
GRAPH = (
    [(m, d) for d in (None, "citeseer") for m in ("gcn", "gat", "cheb", "spline", "dna", "gae")]
    # DNA on the paper's own split too (a random stratified 20/20/60, drawn with each run's seed)
    + [("dna", d) for d in ("cora-stratified", "citeseer-stratified")]
)
ENTRIES = (
    [("graph", f"{m}-cora", d) for m, d in GRAPH]
    + [("recsys", f"{m}-ml100k", None) for m in ("fm", "deepfm", "dcn", "autoint", "afn")]
    + [("transformer", "lm-shakespeare", None), ("nerf", "nerf", None)]
)
PLACEMENTS = ("macro", "micro", "linear")


def result_name(task: str, data: str | None) -> str:
    return task + ("" if data is None else f"@{data}")


def compare_command(family: str, task: str, data: str | None) -> list[str]:
    cmd = [
        "dfa-kernels",
        "compare",
        task,
        "--seeds",
        *SEEDS,
        "--threads",
        "1",
        "--no-progress",
        "--out",
        "runs/zoo",
        "--json",
        str(RESULTS / f"{result_name(task, data)}.json"),
    ]
    if data is not None:
        cmd += ["--data", data]
    if family == "transformer":
        cmd += ["--placement", *PLACEMENTS]
    if task == "fm-ml100k":  # no hidden layer: every mode trains it exactly, bp alone is the row (no DFA,
        cmd += ["--modes", "bp"]  # so no feedback to choose and no alignment to measure)
    else:
        cmd += ["--feedback", "paper", "ours", "--alignment-every", AT_THE_END]
    return cmd


def tune_command(family: str, task: str, data: str | None) -> list[str] | None:
    if data is not None:  # tuned once per task, on its default data
        return None
    cmd = [
        "dfa-kernels",
        "tune",
        task,
        "--threads",
        "1",
        "--no-progress",
        "--out",
        "runs/zoo",
        "--json",
        str(RESULTS / "tuning" / f"{task}.json"),
    ]
    if family == "transformer":
        cmd += ["--placement", *PLACEMENTS]
    if task == "fm-ml100k":
        cmd += ["--modes", "bp"]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="compare", choices=["compare", "tune"])
    ap.add_argument("--families", nargs="+", default=["graph", "recsys", "transformer", "nerf"])
    ap.add_argument("--tasks", nargs="+", default=None, help="only these tasks")
    ap.add_argument("--list", action="store_true", help="print the commands only")
    ap.add_argument("--force", action="store_true", help="rerun commands whose JSON exists")
    ap.add_argument("--jobs", type=int, default=1, help="commands run at once (each on one CPU thread)")
    args = ap.parse_args()
    todo = []
    for family, task, data in ENTRIES:
        if family not in args.families or (args.tasks and task not in args.tasks):
            continue
        cmd = compare_command(family, task, data) if args.what == "compare" else tune_command(family, task, data)
        if cmd is None:
            continue
        target = ROOT / cmd[cmd.index("--json") + 1]
        print(("[done] " if target.exists() and not args.force else "") + shlex.join(cmd), flush=True)
        if not args.list and (args.force or not target.exists()):
            todo.append(cmd)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for cmd, rc in zip(todo, pool.map(lambda c: subprocess.run(c, cwd=ROOT).returncode, todo)):
            if rc:
                print(f"FAILED ({rc}): {shlex.join(cmd)}", flush=True)


if __name__ == "__main__":
    main()
