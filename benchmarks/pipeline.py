"""Pipeline-parallel DFA against pipelined BP (GPipe, 1F1B) and one process, measured and modelled.

    OMP_NUM_THREADS=1 python benchmarks/pipeline.py [--stages 2 4] [--microbatches 4] [--curves]

Per stage count S (S gloo processes on this machine, one thread each, the same stages and
microbatches): the step time and throughput of each schedule and of one process (gradient
accumulation over the same microbatches), bytes sent per step, the bubble (1 - the stages'
profiled compute / (S x step)), the per-stage costs (Pipeline.profile), the link's latency and
bandwidth (a gloo ping-pong), and the event-driven model's prediction of each measured step; then
the model's projection to S = 8..64 on GPU-like ratios (labelled a projection). --curves adds loss
against wall-clock on lm-pydoc: `dfa-kernels train --pipeline 2`, DFA and BP.
Writes benchmarks/results/pipeline/pipeline.json and benchmarks/plots/pipeline_*.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pipeline"
PLOTS = ROOT / "benchmarks" / "plots"
# the workload: the zoo's Transformer LM (lm-shakespeare's cpu preset, a shorter context), byte vocabulary
MODEL = {"vocab_size": 256, "context": 64, "layers": 4, "d_model": 128, "heads": 4, "d_ff": 512}
BATCH = 16
STEPS, WARMUP = 6, 2


def build(mode: str):
    from dfa_kernels.zoo.models.transformer import TransformerLM

    torch.manual_seed(0)
    return TransformerLM(**MODEL, mode=mode, placement="macro", seed=0)


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["context"] + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def ping_pong(rank: int) -> dict:
    """Seconds one way for a small and a large message between ranks 0 and 1 (median of 10)."""
    out = {}
    for nbytes in (8, 4 << 20):
        t = torch.zeros(nbytes // 4)
        times = []
        for _ in range(10):
            dist.barrier()
            tic = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            elif rank == 1:
                dist.recv(t, 0)
                dist.send(t, 0)
            times.append((time.perf_counter() - tic) / 2)
        out[nbytes] = statistics.median(times)
    latency = out[8]
    return {
        "latency_s": latency,
        "bandwidth": (4 << 20) / max(out[4 << 20] - latency, 1e-9),
        "one_way_s": {str(k): v for k, v in out.items()},
    }


def one_process_step(mode: str, M: int) -> list[float]:
    """The single-process step: gradient accumulation over the same M microbatches (loss / M)."""
    import torch.nn.functional as F

    model = build(mode)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for step in range(WARMUP + STEPS):
        x, t = batch(step)
        tic = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for xm, tm in zip(x.chunk(M), t.chunk(M)):
            (F.cross_entropy(model(xm).flatten(0, 1), tm.flatten()) / M).backward()
        opt.step()
        times.append(time.perf_counter() - tic)
    return times[WARMUP:]


def worker(rank: int, size: int, store: str, M: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=600)
    )
    from dfa_kernels import pipeline as pl

    link = ping_pong(rank)
    runs = {}
    for schedule in ("dfa", "gpipe", "1f1b"):
        model = build("dfa" if schedule == "dfa" else "bp")
        x, _ = batch(0)
        pipe = pl.Pipeline(model, size, M, x[:1], schedule=schedule)
        opt = torch.optim.Adam(pipe.parameters(), lr=1e-3)
        runs[schedule] = (pipe, opt, model)
    profiles = {s: runs[s][0].profile(*batch(0)) for s in runs}
    times = {s: [] for s in runs}
    stats = {}
    for step in range(WARMUP + STEPS):  # the schedules interleaved, step by step: the same machine load
        for schedule, (pipe, opt, _) in runs.items():
            dist.barrier()
            tic = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            pipe.step(*batch(step))
            opt.step()
            dist.barrier()
            if step >= WARMUP:
                times[schedule].append(time.perf_counter() - tic)
                stats[schedule] = pipe.stats
    single = {}
    if rank == 0:  # one process, the others waiting at the barrier
        single = {"dfa": one_process_step("dfa", M), "bp": one_process_step("bp", M)}
    dist.barrier()
    out = {
        "rank": rank,
        "link": link,
        "profiles": profiles,
        "times": times,
        "single": single,
        "opt_s": {},
        "stats": {s: {k: v for k, v in vars(st).items() if k != "events"} for s, st in stats.items()},
        "events": [list(e) for e in stats["dfa"].events],
    }
    for schedule, (pipe, opt, _) in runs.items():  # one optimizer step of this stage alone
        for p in pipe.parameters():
            p.grad = torch.zeros_like(p)
        tic = time.perf_counter()
        opt.step()
        out["opt_s"][schedule] = time.perf_counter() - tic
    queue.put(out)
    dist.destroy_process_group()


def run_ranks(target, size: int, *args) -> list:
    """`target(rank, size, store, *args, queue)` on `size` spawned processes (a gloo group through
    the file `store`); what each puts on the queue, in arrival order."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        procs = [ctx.Process(target=target, args=(r, size, store, *args, queue)) for r in range(size)]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"a worker exited with {p.exitcode}")
    return results


def measure(size: int, M: int) -> list[dict]:
    return sorted(run_ranks(worker, size, M), key=lambda r: r["rank"])


def boundary_bytes(M: int) -> tuple[int, int]:
    """Bytes per microbatch of one activation at a cut ([B/M, T, d_model] fp32) and of e (error
    after the final LN: [B/M, T, d_model])."""
    rows = BATCH // M * MODEL["context"]
    return rows * MODEL["d_model"] * 4, rows * MODEL["d_model"] * 4


def model_costs(ranks: list[dict], schedule: str, M: int):
    from dfa_kernels.pipeline import simulate

    profiles = [r["profiles"][schedule] for r in ranks]
    act, err = boundary_bytes(M)
    S = len(ranks)
    return simulate.Costs(
        [p["forward_s"] for p in profiles],
        [p["backward_s"] for p in profiles],
        [act] * (S - 1),
        error_bytes=err if schedule == "dfa" else 0,
        error=profiles[-1]["error_s"],
        optimizer=[r["opt_s"][schedule] for r in ranks],
    )


def summarise(size: int, M: int, ranks: list[dict]) -> dict:
    from dfa_kernels.pipeline import simulate

    link = ranks[0]["link"]
    cores = os.cpu_count()
    tokens = BATCH * MODEL["context"]
    row = {
        "stages": size,
        "microbatches": M,
        "processes_per_core": round(size / cores, 2),
        "oversubscribed": size > cores,
        "link": link,
        "schedules": {},
    }
    single = ranks[0]["single"]
    for mode, times in single.items():
        med = statistics.median(times)
        row["schedules"][f"one-process-{mode}"] = {"step_s": med, "tokens_per_s": tokens / med, "samples_s": times}
    for schedule in ("dfa", "gpipe", "1f1b"):
        step = statistics.median(max(r["times"][schedule][i] for r in ranks) for i in range(STEPS))
        costs = model_costs(ranks, schedule, M)
        predicted = simulate.simulate(
            schedule,
            costs,
            M,
            simulate.Link(link["latency_s"], link["bandwidth"]),
            cores=cores if size > cores else None,
        )
        busy = sum(predicted["busy_s"])
        sent = sum(
            r["stats"][schedule]["bytes_activations"]
            + r["stats"][schedule]["bytes_gradients"]
            + r["stats"][schedule]["bytes_errors"]
            for r in ranks
        )
        row["schedules"][schedule] = {
            "step_s": step,
            "tokens_per_s": tokens / step,
            "samples_s": [r["times"][schedule] for r in ranks],
            "bubble_measured": 1 - busy / (size * step),
            "model_step_s": predicted["step_s"],
            "model_bubble": predicted["bubble"],
            "model_error": predicted["step_s"] / step - 1,
            "bytes_per_step": sent,
            "bytes_per_step_model": simulate.bytes_per_step(schedule, costs, M),
            "bytes_by_kind": {
                k: sum(r["stats"][schedule][k] for r in ranks)
                for k in ("bytes_activations", "bytes_gradients", "bytes_errors", "bytes_headers")
            },
            "profiles": [r["profiles"][schedule] for r in ranks],
            "optimizer_s": [r["opt_s"][schedule] for r in ranks],
        }
    row["dfa_events_rank0"] = ranks[0]["events"]
    return row


def projection(measured: dict) -> dict:
    """The model at S = 8..64 on GPU-like ratios (a projection, not a measurement): one stage = one
    block of a GPT-2-medium-like model (d_model 1024, microbatch 8 x 1024 tokens, bf16 activations),
    forward 1 ms; BP backward 2x forward; DFA backward = the weight gradients (1x forward) plus the
    projection of e (the stage's point: 2 d_e d_l per token against the block's ~24 d^2: ~1/12 of
    the forward); the loss and e: 0.1 ms; M = 4 S microbatches; links: NVLink-like (5 us, 100 GB/s)
    and a network (20 us, 12.5 GB/s), sends from one stage serialised."""
    from dfa_kernels.pipeline import simulate

    act = 8 * 1024 * 1024 * 2
    out = {"assumptions": projection.__doc__.split("(a projection, not a measurement): ")[1], "rows": []}
    for name, link in (("nvlink", simulate.Link(5e-6, 100e9)), ("network", simulate.Link(20e-6, 12.5e9))):
        for S in (8, 16, 32, 64):
            M = 4 * S
            row = {"link": name, "stages": S, "microbatches": M}
            for schedule, backward in (("dfa", 1e-3 * (1 + 1 / 12)), ("gpipe", 2e-3), ("1f1b", 2e-3)):
                for error_width, label in ((1024, "e at d_model"), (16, "e 16 wide")):
                    if schedule != "dfa" and error_width != 1024:
                        continue
                    costs = simulate.Costs(
                        [1e-3] * S,
                        [backward] * S,
                        [act] * (S - 1),
                        error_bytes=8 * 1024 * error_width * 2,
                        error=1e-4 if schedule == "dfa" else 0,
                    )
                    r = simulate.simulate(schedule, costs, M, link)
                    key = schedule if schedule != "dfa" else f"dfa ({label})"
                    row[key] = {"step_s": r["step_s"], "bubble": r["bubble"], "bytes": r["bytes"]}
            out["rows"].append(row)
    return out


def plots(result: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(result["measured"]), figsize=(5 * len(result["measured"]), 3.6), squeeze=False)
    for ax, row in zip(axes[0], result["measured"]):
        names = [n for n in ("one-process-bp", "one-process-dfa", "gpipe", "1f1b", "dfa") if n in row["schedules"]]
        steps = [row["schedules"][n]["step_s"] * 1e3 for n in names]
        model = [row["schedules"][n].get("model_step_s", float("nan")) * 1e3 for n in names]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], steps, 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], model, 0.4, label="event model")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_ylabel("step (ms)")
        ax.set_title(
            f"S={row['stages']} processes, M={row['microbatches']}"
            + (" (oversubscribed)" if row["oversubscribed"] else "")
        )
        ax.legend()
    fig.tight_layout()
    path = PLOTS / "pipeline_steps.png"
    fig.savefig(path, dpi=120)
    written.append(str(path.relative_to(ROOT)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, ("nvlink", "network")):
        rows = [r for r in result["projection"]["rows"] if r["link"] == name]
        S = [r["stages"] for r in rows]
        for key in ("gpipe", "1f1b", "dfa (e at d_model)", "dfa (e 16 wide)"):
            ax.plot(S, [r[key]["step_s"] * 1e3 for r in rows], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stages S (M = 4 S)")
        ax.set_ylabel("step (ms)")
        ax.set_title(f"projection, {name} link (not measured)")
        ax.legend()
    fig.tight_layout()
    path = PLOTS / "pipeline_projection.png"
    fig.savefig(path, dpi=120)
    written.append(str(path.relative_to(ROOT)))
    if result.get("curves"):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for mode, curve in result["curves"].items():
            ax.plot(
                [r["seconds"] for r in curve["history"]],
                [r["val_loss"] for r in curve["history"]],
                marker="o",
                label=f"{mode}, pipeline 2 x {curve['microbatches']}",
            )
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("validation loss (lm-pydoc)")
        ax.legend()
        fig.tight_layout()
        path = PLOTS / "pipeline_lm_loss_time.png"
        fig.savefig(path, dpi=120)
        written.append(str(path.relative_to(ROOT)))
    return written


def curves(M: int, epochs: int) -> dict:
    """Loss against wall-clock: lm-pydoc trained by `dfa-kernels train --pipeline 2` in modes dfa and bp."""
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in ("dfa", "bp"):
            cmd = [
                sys.executable,
                "-m",
                "dfa_kernels",
                "train",
                "lm-pydoc",
                "--mode",
                mode,
                "--epochs",
                str(epochs),
                "--pipeline",
                "2",
                "--microbatches",
                str(M),
                "--no-progress",
                "--out",
                folder,
            ]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            variant = "dfa-macro" if mode == "dfa" else "bp"
            metrics = json.loads((Path(folder) / "lm-pydoc" / f"{variant}-pipeline2x{M}" / "metrics.json").read_text())
            out[mode] = {
                "command": " ".join(["dfa-kernels", *cmd[3:-2]]),
                "microbatches": M,
                "history": metrics["history"],
                "final": metrics["final"],
                "wall_time_s": metrics["wall_time_s"],
            }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--curves", action="store_true", help="also loss vs wall-clock on lm-pydoc (DFA and BP)")
    parser.add_argument("--curve-epochs", type=int, default=4)
    args = parser.parse_args(argv)
    from dfa_kernels.provenance import provenance

    result = {
        "provenance": provenance(),
        "load_average_before": os.getloadavg(),
        "workload": {
            "model": "TransformerLM",
            **MODEL,
            "placement": "macro",
            "error_at": "hidden",
            "batch": BATCH,
            "steps_timed": STEPS,
            "warmup": WARMUP,
            "threads_per_process": 1,
            "backend": "gloo",
        },
        "measured": [],
    }
    for size in args.stages:
        result["measured"].append(summarise(size, args.microbatches, measure(size, args.microbatches)))
    result["load_average_after"] = os.getloadavg()
    result["projection"] = projection(result)
    if args.curves:
        result["curves"] = curves(args.microbatches, args.curve_epochs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    PLOTS.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    for row in result["measured"]:
        print(f"S={row['stages']} M={row['microbatches']} (oversubscribed: {row['oversubscribed']})")
        for name, s in row["schedules"].items():
            extra = (
                f" bubble {s['bubble_measured']:.2f} model {s['model_step_s'] * 1e3:.1f} ms "
                f"({s['model_error']:+.0%}) bytes {s['bytes_per_step']}"
                if "model_step_s" in s
                else ""
            )
            print(f"  {name:<16} {s['step_s'] * 1e3:8.1f} ms {s['tokens_per_s']:9.0f} tok/s{extra}")


if __name__ == "__main__":
    main()
