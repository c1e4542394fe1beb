"""The `dfa-kernels` command: info, demo, bench, train, compare, scaling."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _info(args) -> None:
    from . import build_info
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def _demo(args) -> None:
    from .demo import main
    main(epochs=args.epochs, progress=not args.no_progress)


def _bench(args) -> None:
    from .bench.suite import run_suite
    # --time-budget: none given -> the device's default (-1), 0 -> no limit (None)
    budget = -1.0 if args.time_budget is None else (None if args.time_budget == 0 else args.time_budget)
    run_suite(args.device, Path(args.out), args.suite, quick=args.quick, tiny=args.tiny, time_budget_s=budget,
              progress=not args.no_progress)


def _train(args) -> None:
    from .zoo import tasks
    if args.list:
        for name, task in sorted(tasks.all_tasks().items()):
            print(f"{name:<18} {task.family:<12} {task.description}")
        return
    if not args.task:
        sys.exit("dfa-kernels train: name a TASK (dfa-kernels train --list shows them)")
    from .zoo.training import run_task
    run_task(tasks.get(args.task), tasks.TrainConfig(
        task=args.task, mode=args.mode, placement=args.placement, preset=args.preset, device=args.device,
        epochs=args.epochs, lr=args.lr, seed=args.seed, data=args.data, out=Path(args.out),
        progress=not args.no_progress))


def _compare(args) -> None:
    from .zoo import tasks
    from .zoo.training import compare_task
    compare_task(tasks.get(args.task), preset=args.preset, device=args.device, epochs=args.epochs,
                 seed=args.seed, data=args.data, out=Path(args.out), placement=args.placement,
                 progress=not args.no_progress)


def _scaling(args) -> None:
    from .studies import scaling
    if args.plan:
        print(scaling.describe_plan(args.preset))
        return
    result = scaling.sweep(args.preset, args.out, data=args.data, tokenizer=args.tokenizer, device=args.device,
                           stage=args.stage, resume=args.resume, time_budget_s=args.time_budget,
                           progress=not args.no_progress, command=["dfa-kernels", *sys.argv[1:]])
    if result is not None:
        print(scaling.summary(result))
        print(f"wrote {Path(args.out) / 'scaling.json'} and its plots")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfa-kernels", description="Fast Direct Feedback Alignment for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, compiled kernels and backends per device")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_info)

    s = sub.add_parser("demo", help="BP vs DFA vs shallow on scikit-learn's digits (about a minute on a CPU)")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_demo)

    s = sub.add_parser("bench", help="projection and training-step benchmarks, plots, README summary",
                       description="Projection microbenchmark (writes the backend table backend='auto' reads), "
                                   "then training steps (DFA vs BP vs TinyDFA-style), then plots; results JSON "
                                   "and plots under --out. A full run from a checkout also updates "
                                   "benchmarks/results/, benchmarks/plots/ and README.md's summary block.")
    s.add_argument("suite", nargs="?", default="all", choices=["all", "projection", "step"])
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--out", default="benchmarks/results", help="folder for the results JSON and plots")
    s.add_argument("--quick", action="store_true",
                   help="fewer shapes and repeats (files named *_quick; nothing outside --out changes)")
    s.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole suite; later measurements are skipped and listed "
                        "(default: 390 on a GPU, none on a CPU; 0: no limit)")
    s.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test sizes
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_bench)

    def add_run_options(s):
        s.add_argument("--preset", default="cpu", choices=["cpu", "full"])
        s.add_argument("--device", default="cpu")
        s.add_argument("--epochs", type=int, default=None)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--placement", default="macro", choices=["macro", "micro", "linear"])
        s.add_argument("--data", default=None, help="your own files in the paper's format (see the task)")
        s.add_argument("--out", default="runs")
        s.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("train", help="train one zoo task in one mode")
    s.add_argument("task", nargs="?")
    s.add_argument("--list", action="store_true", help="list the tasks")
    s.add_argument("--mode", default="dfa", choices=["bp", "dfa", "shallow"])
    s.add_argument("--lr", type=float, default=None)
    add_run_options(s)
    s.set_defaults(func=_train)

    s = sub.add_parser("scaling", help="scaling laws: BP vs DFA placements over model sizes and budgets (paper 2)",
                       description="A sweep of model sizes x methods (bp, dfa-macro, dfa-micro, dfa-linear, shallow) "
                                   "x token budgets; frontier fits L(C) = E + A C^-alpha with bootstrap CIs and the "
                                   "verdict per DFA placement. Results: OUT/scaling.json and plots. Resumable: the "
                                   "same command continues an interrupted sweep.")
    s.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
    s.add_argument("--data", default=None, help="a WikiText-style corpus (a wiki.*.tokens directory or one text "
                                                "file); default: Shakespeare + gensim's Wikipedia articles")
    s.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"], help="bpe: trained on the training split")
    s.add_argument("--out", default="runs/scaling")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--stage", default="all", help="'all', 'fit' (analyse the finished runs), or a stage number "
                                                  "(see --plan): the GPU preset runs in stages of ~8 minutes")
    s.add_argument("--resume", action="store_true", help="continue the sweep recorded in OUT/plan.json")
    s.add_argument("--time-budget", type=float, default=None, help="seconds; start no new run after that")
    s.add_argument("--plan", action="store_true", help="print the preset's runs and stages, and exit")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_scaling)

    s = sub.add_parser("compare", help="BP vs DFA vs shallow on one task, beside the paper's numbers")
    s.add_argument("task")
    add_run_options(s)
    s.set_defaults(func=_compare)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "x") is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    args.func(args)
    if args.command not in ("info",):
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
