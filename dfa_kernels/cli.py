"""The `dfa-kernels` command: info, demo, bench, train, compare, align, tsne, tune, scaling."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .zoo.tasks import BASE_MODES, MODES


class UsageError(Exception):
    """A bad argument found after parsing (an unknown task, a device that is not there): the
    command exits with status 2 and this one-line message, as argparse does for its own checks."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (usage stays behind --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _positive(kind, zero: bool = False):
    """An argparse type: a positive (or, with `zero`, non-negative) finite int or float."""
    what = f"{'non-negative' if zero else 'positive'} {kind.__name__}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what}; got {text!r}") from None
        if not (value >= 0 if zero else value > 0) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a {what}; got {text!r}")
        return value

    return parse


def _task(name: str, modes=(), preset: str = "cpu"):
    """The zoo task `name`, refusing in one line a mode of `modes` it does not train or a preset
    it does not define."""
    from .zoo import tasks

    try:
        task = tasks.get(name)
    except KeyError as err:
        raise UsageError(f"{err.args[0]} (dfa-kernels train --list describes them)") from None
    try:
        for mode in modes:
            task.check_mode(mode)
        task.check_preset(preset)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return task


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device must be a torch device such as cpu or cuda; got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
        )
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda; got {device!r}")


def _info(args) -> None:
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    found = info.pop("warnings")
    width = max(map(len, info))
    for key, value in info.items():
        if key == "self_test" and isinstance(value, dict):  # one line per GPU and backend
            value = [f"{d} {b}: {result}" for d, results in value.items() for b, result in results.items()]
            print("\n".join(f"{key if i == 0 else '':<{width}}  {line}" for i, line in enumerate(value)))
            continue
        print(f"{key:<{width}}  {value}")
    for line in found:  # every fallback in effect, with its fix
        print(f"WARNING: {line}")


def _demo(args) -> None:
    from .demo import main

    main(epochs=args.epochs, progress=not args.no_progress)


def _bench(args) -> None:
    import torch

    from . import ops
    from .bench.suite import run_suite

    if args.cpu_isa != "native":
        if args.device is not None and torch.device(args.device).type != "cpu":
            raise UsageError(f"--cpu-isa {args.cpu_isa} measures the CPU kernels; it needs --device cpu")
        _bench_cpu_paths(args, ops.cpu_isas_supported() if args.cpu_isa == "all" else [args.cpu_isa])
        return
    # --time-budget: none given -> the device's default (-1), 0 -> no limit (None)
    budget = -1.0 if args.time_budget is None else (None if args.time_budget == 0 else args.time_budget)
    run_suite(
        args.device,
        Path(args.out),
        args.suite,
        quick=args.quick,
        tiny=args.tiny,
        time_budget_s=budget,
        progress=not args.no_progress,
    )


def _bench_cpu_paths(args, isas: list[str]) -> None:
    """The CPU suite once per instruction-set path, each in its own process: ATen's, MKL's and oneDNN's
    dispatch are chosen at load time (bench.common.isa_env), so the torch baselines take the path too."""
    import subprocess

    from . import ops
    from .bench.common import isa_env

    supported = ops.cpu_isas_supported()
    for isa in isas:
        if isa not in supported:
            raise UsageError(f"--cpu-isa {isa}: this CPU runs {', '.join(supported) or 'no compiled path'}")
    for isa in isas:
        argv = [
            sys.executable,
            "-m",
            "dfa_kernels",
            "bench",
            args.suite,
            "--device",
            "cpu",
            "--out",
            args.out,
            "--cpu-isa",
            "native",
        ]
        argv += ["--quick"] * args.quick + ["--tiny"] * args.tiny + ["--no-progress"] * args.no_progress
        if args.time_budget is not None:
            argv += ["--time-budget", str(args.time_budget)]
        print(f"== CPU path {isa}: {' '.join(f'{k}={v}' for k, v in isa_env(isa).items())}", flush=True)
        done = subprocess.run(argv, env={**os.environ, **isa_env(isa)})
        if done.returncode != 0:
            raise SystemExit(done.returncode)


def _config(args, **overrides):
    """The TrainConfig of a run subcommand's options (the first --feedback and --placement, for
    the subcommands that take several)."""
    from .zoo import tasks

    fields = dict(
        task=args.task,
        mode=getattr(args, "mode", "dfa"),
        placement=args.placement[0],
        preset=args.preset,
        device=args.device,
        epochs=args.epochs,
        lr=getattr(args, "lr", None),
        seed=args.seed,
        data=args.data,
        out=Path(args.out),
        progress=not args.no_progress,
        feedback=args.feedback[0],
        alignment_every=getattr(args, "alignment_every", None),
    )
    return tasks.TrainConfig(**{**fields, **overrides})


def _train(args) -> None:
    from .zoo import tasks

    if args.list:
        for name, task in sorted(tasks.all_tasks().items()):
            print(f"{name:<18} {task.family:<12} {task.description}")
        return
    if not args.task:
        raise UsageError("name a TASK (dfa-kernels train --list shows them)")
    task = _task(args.task, [args.mode], args.preset)
    from .zoo import distributed
    from .zoo.checkpoint import CheckpointError
    from .zoo.training import run_task

    world = distributed.init(args.device)  # a torchrun worker (WORLD_SIZE > 1), else None
    if args.pipeline:
        _train_pipeline(args, task, world)
        return
    if world is None and args.nproc > 1:
        distributed.launch(args.nproc, _without_option(args.argv, "--nproc"))
        return
    try:
        run_task(
            task,
            _config(args, compile=args.compile, fsdp=args.fsdp),
            world=world,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            stop_after=args.stop_after,
        )
    except CheckpointError as err:  # --resume of a checkpoint this run cannot continue: one line
        first, *listed = str(err).splitlines()
        raise UsageError(" ".join([f"--resume {args.resume}: {first}", "; ".join(s.strip() for s in listed)])) from None
    finally:
        if world is not None:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train_pipeline(args, task, world) -> None:
    """--pipeline S [--nproc R]: S x R workers through torchrun's launcher, each one stage of one of
    R pipeline replicas (dfa_kernels.pipeline.train)."""
    if args.pipeline < 2 or args.fsdp or args.compile:
        raise UsageError(
            "--pipeline S needs S >= 2, and not --fsdp or --compile (one process per stage; --nproc R: R replicas)"
        )
    if world is None:  # the workers read R from the world's size (torchrun's parser would take --nproc)
        from .pipeline.train import check
        from .zoo import distributed

        try:  # a run the pipeline refuses: one line here, not a traceback from every worker
            check(task.build(_config(args, device="cpu")), args.pipeline, args.nproc, args.microbatches)
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from None
        distributed.launch(args.pipeline * args.nproc, _without_option(args.argv, "--nproc"))
        return
    if world.size % args.pipeline:
        raise UsageError(
            f"--pipeline {args.pipeline} under a launcher of {world.size} processes: one process per stage "
            "of each replica (a multiple of S)"
        )
    from .pipeline.train import run_task

    try:
        run_task(
            task,
            _config(args),
            world,
            args.microbatches,
            stages=args.pipeline,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            stop_after=args.stop_after,
        )
    finally:
        import torch.distributed

        torch.distributed.destroy_process_group()


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE` (what each launched worker runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _compare(args) -> None:
    task = _task(args.task, args.modes, args.preset)
    from .zoo.training import compare_task

    compare_task(
        task,
        _config(args),
        seeds=args.seeds,
        modes=args.modes,
        feedbacks=args.feedback,
        placements=args.placement,
        json_path=Path(args.json) if args.json else None,
    )


def _align(args) -> None:
    _task(args.task, [args.mode], args.preset)
    from .studies.alignment import run_study

    run_study(args.task, _config(args, alignment_every=args.every), measurements=args.measurements)


def _tsne(args) -> None:
    _task(args.task, preset=args.preset)
    from .studies.tsne import run_study

    run_study(args.task, _config(args), max_points=args.max_points)


def _tune(args) -> None:
    task = _task(args.task, args.modes, args.preset)
    from .zoo.tuning import tune

    tune(
        task,
        _config(args),
        modes=args.modes,
        json_path=Path(args.json) if args.json else None,
        placements=args.placement,
    )


def _scaling(args) -> None:
    from .studies import scaling

    try:
        scaling.with_methods(scaling.PRESETS[args.preset], args.methods)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.plan:
        print(scaling.describe_plan(args.preset, methods=args.methods))
        return
    result = scaling.sweep(
        args.preset,
        args.out,
        data=args.data,
        tokenizer=args.tokenizer,
        device=args.device,
        stage=args.stage,
        resume=args.resume,
        time_budget_s=args.time_budget,
        progress=not args.no_progress,
        command=["dfa-kernels", *sys.argv[1:]],
        methods=args.methods,
    )
    if result is not None:
        print(scaling.summary(result))
        print(f"wrote {Path(args.out) / 'scaling.json'} and its plots")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dfa-kernels", description="Fast Direct Feedback Alignment for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, compiled kernels and backends per device")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_info)

    s = sub.add_parser("demo", help="BP vs DFA vs shallow on scikit-learn's digits (about a minute on a CPU)")
    s.add_argument("--epochs", type=_positive(int), default=20)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_demo)

    s = sub.add_parser(
        "bench",
        help="projection and training-step benchmarks, plots, README summary",
        description="Projection microbenchmark (writes the backend table backend='auto' reads), "
        "then training steps (DFA vs BP vs TinyDFA-style), then plots; results JSON "
        "and plots under --out. A full run from a checkout also updates "
        "benchmarks/results/, benchmarks/plots/ and README.md's summary block.",
    )
    s.add_argument("suite", nargs="?", default="all", choices=["all", "projection", "step"])
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--out", default="benchmarks/results", help="folder for the results JSON and plots")
    s.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes and repeats (files named *_quick; nothing outside --out changes)",
    )
    s.add_argument(
        "--time-budget",
        type=_positive(float, zero=True),
        default=None,
        help="seconds for the whole suite; later measurements are skipped and listed "
        "(default: 390 on a GPU, none on a CPU; 0: no limit)",
    )
    s.add_argument(
        "--cpu-isa",
        default="native",
        choices=["native", "all", "avx512", "avx2", "baseline"],
        help="the CPU kernels' instruction-set path to measure, each in its own process with ATen, MKL "
        "and oneDNN on the same path (all: every path this CPU runs; default: this process's)",
    )
    s.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke-test sizes
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_bench)

    def add_run_options(s, several: bool = False):
        """Options of every zoo run; with `several`, --feedback and --placement take lists."""
        many = dict(nargs="+") if several else dict(nargs=1)
        s.add_argument(
            "--preset",
            default="cpu",
            help="the recipe's sizes and budget: cpu (minutes on a CPU) or full (the paper's); lm-shakespeare "
            "also cpu-tied (one learning rate for every parameter) and cpu-paper (paper 1's architecture)",
        )
        s.add_argument("--device", default="cpu")
        s.add_argument("--epochs", type=_positive(int), default=None, help="the most epochs (evaluation rounds)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument(
            "--placement",
            default=["macro"],
            choices=["macro", "micro", "linear"],
            **many,
            help="Transformer feedback points (mode dfa)",
        )
        s.add_argument(
            "--feedback",
            default=["paper"],
            choices=["paper", "ours"],
            **many,
            help="paper: one shared B, TinyDFA's (default); ours: one B per point",
        )
        s.add_argument("--data", default=None, help="another dataset or your own files (see the task)")
        s.add_argument("--out", default="runs")
        s.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)")
        s.add_argument("--no-progress", action="store_true")

    def add_modes_and_report(s):
        """Options of a command over several modes that writes one report (compare, tune)."""
        s.add_argument(
            "--modes",
            nargs="+",
            default=list(BASE_MODES),
            choices=MODES,
            help="methods to run (default: bp dfa shallow); any of the family (dfa_kernels.methods)",
        )
        s.add_argument("--json", default=None, help="also write the report here")

    s = sub.add_parser("train", help="train one zoo task in one mode")
    s.add_argument("task", nargs="?")
    s.add_argument("--list", action="store_true", help="list the tasks")
    s.add_argument("--mode", default="dfa", choices=MODES)
    s.add_argument("--lr", type=_positive(float), default=None)
    s.add_argument(
        "--alignment-every",
        type=_positive(int),
        default=None,
        metavar="N",
        help="measure DFA's alignment with backprop every N steps (into metrics.json)",
    )
    s.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N local processes (torch.distributed.run; DDP, gloo on CPU, NCCL on CUDA)",
    )
    s.add_argument("--fsdp", action="store_true", help="with --nproc / torchrun: FSDP2 (fully_shard) instead of DDP")
    s.add_argument(
        "--pipeline",
        type=int,
        default=0,
        metavar="S",
        help="pipeline-parallel: the model cut into S stages on S processes (DFA's schedule; 1F1B for bp); "
        "with --nproc R, R data-parallel replicas of the pipeline (S x R processes)",
    )
    s.add_argument(
        "--microbatches",
        type=_positive(int),
        default=4,
        metavar="M",
        help="with --pipeline: microbatches per global batch (must divide the batch size)",
    )
    s.add_argument(
        "--compile", action="store_true", help="the training step (forward, backward, optimizer) under torch.compile"
    )
    s.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="STEPS",
        help="write OUT/TASK/VARIANT/checkpoint.pt every STEPS steps (atomically)",
    )
    s.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run from its checkpoint (a run folder, or the checkpoint file), with the "
        "first run's options; a larger --epochs trains it for longer (the learning-rate schedule "
        "stays the first run's)",
    )
    s.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="STEPS",
        help="end this session after STEPS steps in total, with a checkpoint (continue with --resume)",
    )
    add_run_options(s)
    s.set_defaults(func=_train)

    s = sub.add_parser(
        "scaling",
        help="scaling laws: BP vs DFA placements over model sizes and budgets (paper 2)",
        description="A sweep of model sizes x methods (bp, dfa-macro, dfa-micro, dfa-linear, shallow) "
        "x token budgets; frontier fits L(C) = E + A C^-alpha with bootstrap CIs and the "
        "verdict per DFA placement. Results: OUT/scaling.json and plots. Resumable: the "
        "same command continues an interrupted sweep.",
    )
    s.add_argument("--preset", default="cpu", choices=["cpu", "cpu-long", "gpu"])
    s.add_argument(
        "--data",
        default=None,
        help="a WikiText-style corpus (a wiki.*.tokens directory or one text "
        "file); default: Shakespeare + gensim's Wikipedia articles",
    )
    s.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"], help="bpe: trained on the training split")
    s.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="the sweep's methods (default: bp dfa-macro dfa-micro dfa-linear shallow): those, a direct "
        "method at a placement (sdfa-macro, ternary-micro, dkp-linear, ...) or a layer-wise one "
        "(fa, usf, brsf, frsf); bp is always run",
    )
    s.add_argument("--out", default="runs/scaling")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument(
        "--stage",
        default="all",
        help="'all', 'fit' (analyse the finished runs), or a stage number "
        "(see --plan): the GPU preset runs in stages of ~8 minutes",
    )
    s.add_argument("--resume", action="store_true", help="continue the sweep recorded in OUT/plan.json")
    s.add_argument("--time-budget", type=float, default=None, help="seconds; start no new run after that")
    s.add_argument("--plan", action="store_true", help="print the preset's runs and stages, and exit")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_scaling)

    s = sub.add_parser(
        "compare",
        help="BP vs DFA vs shallow on one task over seeds, beside the paper's numbers",
        description="Trains every mode (DFA once per --feedback and, for Transformers, per "
        "--placement) for every seed; writes OUT/TASK/compare.{json,txt,png}.",
    )
    s.add_argument("task")
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_modes_and_report(s)
    s.add_argument(
        "--alignment-every",
        type=_positive(int),
        default=None,
        metavar="N",
        help="measure DFA's alignment with backprop every N steps and at the last one",
    )
    add_run_options(s, several=True)
    s.set_defaults(func=_compare)

    s = sub.add_parser(
        "align",
        help="train a task with DFA, measuring its alignment with backprop",
        description="Writes OUT/TASK/alignment.json (every measurement: per point signal and "
        "update cosines) and alignment.png (one line per point over training).",
    )
    s.add_argument("task")
    s.add_argument("--mode", default="dfa", choices=MODES, help="the mode that trains")
    s.add_argument("--every", type=_positive(int), default=None, metavar="N", help="steps between measurements")
    s.add_argument("--measurements", type=_positive(int), default=20, help="with no --every: how many over training")
    add_run_options(s)
    s.set_defaults(func=_align)

    s = sub.add_parser(
        "tsne",
        help="t-SNE maps of BP, DFA and shallow representations of a task",
        description="Writes OUT/TASK/tsne.json (k-NN accuracy and silhouette of each map, "
        "k-NN on the raw representation) and tsne.png (three panels).",
    )
    s.add_argument("task")
    s.add_argument(
        "--max-points", type=_positive(int), default=3000, help="subsample larger representations (stratified)"
    )
    add_run_options(s)
    s.set_defaults(func=_tsne)

    s = sub.add_parser(
        "tune",
        help="the same learning-rate grid budget for every mode, on validation",
        description="Trains each mode once per candidate of the task's grid (seed 0, the "
        "same number of candidates for every mode) and picks the best "
        "validation metric; writes OUT/TASK/tuning.json.",
    )
    s.add_argument("task")
    add_modes_and_report(s)
    add_run_options(s, several=True)
    s.set_defaults(func=_tune)
    return p


def main(argv=None) -> None:
    from . import provenance

    argv = sys.argv[1:] if argv is None else list(argv)
    provenance.CLI_COMMAND = shlex.join(["dfa-kernels", *argv])
    provenance.git_sha()  # the commit of the code as this command starts (a checkout may move on meanwhile)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    from .zoo.data import DataError

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        if os.environ.get("DFA_KERNELS_CPU_ISA"):  # a bad value or a path this CPU lacks: said before any work
            from . import ops

            try:
                ops.cpu_isa()
            except RuntimeError as err:
                raise UsageError(str(err).splitlines()[0]) from None
        if getattr(args, "device", "x") is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif hasattr(args, "device"):
            _check_device(args.device)
        args.func(args)
    except (UsageError, DataError) as err:  # bad arguments or data files: one line, no traceback
        message = " ".join(str(err).split())
        parser.exit(2, f"{parser.prog} {args.command}: error: {message}\n")
    if args.command not in ("info",) and os.environ.get("RANK", "0") == "0":  # one line per job
        print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
