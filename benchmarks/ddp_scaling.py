"""Data-parallel scaling of a zoo task's training steps on this machine: 1 process vs N (DDP).

    python benchmarks/ddp_scaling.py --task lm-shakespeare --nproc 1 2 --threads 1 --steps 30

Each configuration trains the task with the zoo's trainer (the same global batch: every rank takes
its share) for --warmup + --steps steps of its first epoch, one thread per process; the time between
consecutive steps (no evaluation in between) gives steps/s, and the global batch size samples/s; the
CPU time the first process spent per step shows its share of the work. A 1-process run with as many
threads as the largest N is measured too (the same cores, used by threads instead of processes). The
machine's load average is recorded before and after: on a shared machine the numbers are only as
good as the load allows. Writes benchmarks/results/ddp_scaling_cpu.json.
"""

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(task_name, warmup, steps, world=None):
    """Step times (s) of the first epoch's steps after `warmup` (no evaluation in between)."""
    from dfa_kernels.zoo import tasks
    from dfa_kernels.zoo.trainer import Stopped, Trainer

    run = tasks.get(task_name).build(tasks.TrainConfig(task_name, progress=False))
    if run.steps_per_epoch < warmup + steps:
        raise ValueError(f"{task_name}: {run.steps_per_epoch} steps per epoch < warmup + steps")
    stamps = []

    def on_step(trainer):
        stamps.append((time.perf_counter(), time.process_time()))
        if trainer.step == warmup + steps:
            raise Stopped

    try:
        Trainer(run, progress=False, world=world).fit(on_step)
    except Stopped:
        pass
    steps = list(zip(stamps[warmup - 1 :], stamps[warmup:]))
    return [b[0] - a[0] for a, b in steps], [b[1] - a[1] for a, b in steps], run.hyper_parameters


def _worker(rank, size, port, task_name, warmup, steps, out):
    import torch.distributed as dist

    from dfa_kernels.zoo.distributed import World

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    times, cpu, hp = _steps(task_name, warmup, steps, World(rank, size, rank))
    if rank == 0:
        torch.save({"times": times, "cpu": cpu, "hp": hp}, out)
    dist.destroy_process_group()


def measure(task_name, nproc, threads, warmup, steps, tmp):
    if nproc == 1:
        torch.set_num_threads(threads)
        times, cpu, hp = _steps(task_name, warmup, steps)
    else:
        mp.spawn(_worker, args=(nproc, free_port(), task_name, warmup, steps, tmp), nprocs=nproc, join=True)
        saved = torch.load(tmp, weights_only=False)
        times, cpu, hp = saved["times"], saved["cpu"], saved["hp"]
    batch = hp.get("batch_size") or hp.get("batch_rays")
    median = statistics.median(times)
    # CPU seconds the (first) process spent per step: its share of the work, whatever the load
    return {
        "processes": nproc,
        "threads_per_process": threads if nproc == 1 else 1,
        "median_step_ms": 1e3 * median,
        "min_step_ms": 1e3 * min(times),
        "median_step_cpu_ms_per_process": 1e3 * statistics.median(cpu),
        "samples_per_step": batch,
        "samples_per_s": batch / median if batch else None,
        "steps_timed": len(times),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lm-shakespeare")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_scaling_cpu.json")
    a = p.parse_args(argv)
    from dfa_kernels.provenance import provenance

    load_before = os.getloadavg()
    tmp = a.out.with_suffix(".tmp.pt")
    rows = [measure(a.task, n, 1, a.warmup, a.steps, tmp) for n in a.nproc]
    rows.append(measure(a.task, 1, max(a.nproc), a.warmup, a.steps, tmp))
    tmp.unlink(missing_ok=True)
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_over_1_process_1_thread"] = r["samples_per_s"] / base if base else None
    result = {
        "task": a.task,
        "what": "training steps of the first epoch (no evaluation), DDP over gloo, "
        "the same global batch split across processes",
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "provenance": provenance(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['processes']} process(es) x {r['threads_per_process']} thread(s): {r['median_step_ms']:.1f} ms/step "
            f"(CPU {r['median_step_cpu_ms_per_process']:.1f} ms per process), {r['samples_per_s']:.1f} samples/s "
            f"({r['speedup_over_1_process_1_thread']:.2f}x)"
        )
    print(f"load average before {load_before}, after {result['load_average_after']} on {os.cpu_count()} cores")
    return result


if __name__ == "__main__":
    main()
