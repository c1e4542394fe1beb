"""The random-feedback family's training step against BP's, and against biotorch's same mode.

``python benchmarks/methods.py`` times one training step (zero_grad, forward, cross-entropy,
backward, SGD step) of every method (``dk.convert(model, mode=...)``: the direct methods' one
projection, the layer-wise methods' autograd functions) and of biotorch 0.0.16's fa, usf, brsf,
frsf and dfa (``BioModule``, its default Xavier preset) on the same network, all in one
interleaved run per workload (``time_interleaved``: the variants' samples alternate, so every ratio
compares the same moments of a shared machine):

- ``mlp``: 8 hidden layers of 1024 (ReLU), 1024 inputs, 10 classes, batch 128;
- ``cnn``: cnn-digits's network (conv 3x3 16 -> ReLU -> conv 3x3 stride 2 32 -> ReLU -> linear 10)
  on 8x8 images, batch 128.

BP is the plain model (no DFA module). ``fa-materialized`` is fa with its B stored once
(``storage="materialized"``), beside fa's default storage (the backend table's choice). Targets
(issue 22), reported met or not: layer-wise methods <= 1.05x BP; direct methods within 5% of dfa's
own ratio over BP; every method faster than biotorch's same mode. Memory: the MLP with a 1000-class
head (so B is large), dfa with a virtual and with a materialized B: bytes each keeps after its first
step (a virtual B keeps none) and the step's peak, from torch.profiler's allocation records (CPU:
torch has no allocator statistics).

Writes benchmarks/results/methods_cpu_<isa>.json (provenance: git SHA, command, machine) and
benchmarks/plots/methods_cpu_<isa>.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dfa_kernels as dk  # noqa: E402
from dfa_kernels import methods, ops  # noqa: E402
from dfa_kernels.bench.common import environment, time_interleaved, write_results  # noqa: E402
from dfa_kernels.figures import save_figure  # noqa: E402
from dfa_kernels.provenance import command, machine  # noqa: E402

BIOTORCH_MODES = ("fa", "usf", "brsf", "frsf", "dfa")
LAYERWISE_TARGET = 1.05  # layer-wise step / BP step
DIRECT_SLACK = 1.05  # direct step / BP step, over dfa's own ratio


def mlp(width: int = 1024, depth: int = 8, classes: int = 10) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def cnn(classes: int = 10) -> nn.Sequential:
    """cnn-digits's DigitsCNN (dfa_kernels/zoo/models/image.py), as a plain Sequential."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, classes),
    )


WORKLOADS = {"mlp": (mlp, (128, 1024)), "cnn": (cnn, (128, 1, 8, 8))}


def ours(model: nn.Module, mode: str) -> nn.Module:
    return model if mode == "bp" else dk.convert(model, mode=mode)


def theirs(model: nn.Module, mode: str, classes: int) -> nn.Module:
    from biotorch.module.biomodule import BioModule

    return BioModule(model, mode=mode, output_dim=classes if mode == "dfa" else None)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bio_dfa: bool = False):
    """One SGD training step of `model` on (x, y); the model is the only state it touches."""
    dfa = getattr(model, "dfa", None)
    drtp = dfa is not None and dfa.mode == "drtp"
    with torch.no_grad():  # dkp's learned B exists after a first forward: then the optimizer takes it
        model.eval()
        model(x)
        model.train()
    # lr 0: the same work as any rate, and thousands of steps on one batch cannot diverge (drtp would)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        if drtp:
            dfa.targets(y)
        out = model(x, y, F.cross_entropy) if bio_dfa else model(x)
        F.cross_entropy(out, y).backward()
        opt.step()

    return step


def time_workload(name: str, repeats: int, min_time_s: float, biotorch: bool) -> dict:
    build, shape = WORKLOADS[name]
    torch.manual_seed(0)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    base = build()
    steps = {}
    for mode in methods.MODES:
        if mode == "shallow":
            continue
        steps[mode] = step_fn(ours(copy.deepcopy(base), mode), x, y)
    # fa with its B stored once (storage "materialized") instead of the table's choice for the shape
    steps["fa-materialized"] = step_fn(dk.convert(copy.deepcopy(base), mode="fa", storage="materialized"), x, y)
    if biotorch:
        for mode in BIOTORCH_MODES:
            steps[f"biotorch-{mode}"] = step_fn(theirs(copy.deepcopy(base), mode, 10), x, y, bio_dfa=mode == "dfa")
    device = torch.device("cpu")
    ms = dict(
        zip(steps, time_interleaved(list(steps.values()), device, warmup=3, repeats=repeats, min_time_s=min_time_s))
    )
    ratio = {v: t / ms["bp"] for v, t in ms.items()}
    result = {"shape": list(shape), "classes": 10, "ms": ms, "ratio_over_bp": ratio}
    if biotorch:
        result["speedup_over_biotorch"] = {m: ms[f"biotorch-{m}"] / ms[m] for m in BIOTORCH_MODES}
    result["targets"] = targets(ratio, result.get("speedup_over_biotorch", {}))
    return result


def targets(ratio: dict, speedup: dict) -> list[dict]:
    found = [
        {
            "name": f"{m} / BP",
            "value": ratio[m],
            "target": f"<= {LAYERWISE_TARGET}",
            "met": ratio[m] <= LAYERWISE_TARGET,
        }
        for m in methods.LAYERWISE
    ]
    found += [
        {
            "name": f"{m} / BP",
            "value": ratio[m],
            "target": f"<= {DIRECT_SLACK} x dfa's ({ratio['dfa']:.3f})",
            "met": ratio[m] <= DIRECT_SLACK * ratio["dfa"],
        }
        for m in methods.DIRECT
        if m != "dfa"
    ]
    found += [{"name": f"biotorch {m} / ours", "value": s, "target": "> 1", "met": s > 1} for m, s in speedup.items()]
    return found


def allocations(fn) -> tuple[int, int]:
    """(peak, kept) bytes allocated on the CPU by fn(): the running sum of torch.profiler's
    allocation records in time order (each op's own, children excluded), its maximum and its end."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    now = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return peak, now


def memory(classes: int = 1000) -> dict:
    """dfa with a virtual and a materialized B on the MLP with a `classes`-wide head, and BP: the
    first step from a fresh model (B made, if it is made, and kept), then a second step."""
    torch.manual_seed(0)
    x, y = torch.randn(128, 1024), torch.randint(0, classes, (128,))
    base = mlp(classes=classes)
    out = {"workload": f"mlp 8x1024, {classes} classes, batch 128", "b_bytes_if_stored": 4 * classes * 8 * 1024}
    for variant, model in (
        ("bp", copy.deepcopy(base)),
        ("dfa-virtual", dk.convert(copy.deepcopy(base), mode="dfa", storage="virtual")),
        ("dfa-materialized", dk.convert(copy.deepcopy(base), mode="dfa", storage="materialized")),
    ):
        ops._MATRIX_CACHE.clear()  # a B stored by an earlier call in this process would not show
        step = step_fn(model, x, y)
        first_peak, first_kept = allocations(step)
        second_peak, _ = allocations(step)
        out[variant] = {
            "first_step_peak_bytes": first_peak,
            "kept_after_first_step_bytes": first_kept,
            "later_step_peak_bytes": second_peak,
        }
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["workloads"]), figsize=(6 * len(result["workloads"]), 4.2), squeeze=False)
    for ax, (name, w) in zip(axes[0], result["workloads"].items()):
        names = list(w["ratio_over_bp"])
        colours = [
            "tab:grey"
            if n == "bp"
            else "tab:red"
            if n.startswith("biotorch")
            else "tab:blue"
            if n in methods.LAYERWISE
            else "tab:green"
            for n in names
        ]
        ax.bar(names, [w["ratio_over_bp"][n] for n in names], color=colours)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(LAYERWISE_TARGET, color="tab:blue", lw=0.8, ls="--", label=f"layer-wise target {LAYERWISE_TARGET}x")
        ax.set_title(f"{name}: step time / BP ({w['ms']['bp']:.2f} ms)")
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"training step per method, CPU {result['environment']['machine']['cpu_isa']} "
        f"({result['environment']['device']}, {result['environment']['cpu_threads']} threads): "
        "green direct, blue layer-wise, red biotorch 0.0.16"
    )
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per sample")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--no-biotorch", action="store_true", help="without biotorch's rows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"), help="writes results/ and plots/ under it")
    args = parser.parse_args(argv)
    biotorch = not args.no_biotorch
    if biotorch:
        import biotorch as _  # noqa: F401 - fail now, with pip's hint, rather than after the timings
    device = torch.device("cpu")
    result = {
        "command": command(),
        "environment": environment(device),
        "machine": machine(),
        # the machine is shared: the load it carried while the variants' samples alternated
        "load_average_1_5_15min_at_start": os.getloadavg(),
        "step": "SGD step (lr 0: weights fixed, the work unchanged): zero_grad, forward, cross-entropy, backward, step",
        "biotorch": "0.0.16, BioModule default (Xavier) preset" if biotorch else None,
        "workloads": {name: time_workload(name, args.repeats, args.min_time, biotorch) for name in args.workloads},
        "memory": memory(),
    }
    isa = result["machine"]["cpu_isa"]
    out = Path(args.out)
    path = write_results(out / "results" / f"methods_cpu_{isa}.json", result)
    plot(result, out / "plots" / f"methods_cpu_{isa}.png")
    result["load_average_1_5_15min_at_end"] = os.getloadavg()
    write_results(path, result)
    for name, w in result["workloads"].items():
        print(name, " ".join(f"{v} {r:.3f}" for v, r in w["ratio_over_bp"].items()))
    print(path)
    return result


if __name__ == "__main__":
    main()
