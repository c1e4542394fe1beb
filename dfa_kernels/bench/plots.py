"""Plots of the benchmark results (matplotlib, files only): step-time ratio bars per workload and
variant, and projection throughput vs N with the device's peak line (plus the ratio bars to
torch.mm at the zoo's shapes)."""

from __future__ import annotations

from pathlib import Path

from ..figures import save_figure

VARIANT_LABELS = {
    "bp": "BP",
    "dfa": "DFA unfused (ours)",
    "dfa_fused": "DFA fused (ours)",
    "dfa_shared": "DFA shared layout (ours)",
    "tinydfa_style": "TinyDFA-style",
}
COLORS = {
    "bp": "#7f7f7f",
    "dfa": "#1f77b4",
    "dfa_fused": "#2ca02c",
    "dfa_shared": "#17becf",
    "tinydfa_style": "#d62728",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(res: dict, what: str) -> str:
    env = res["environment"]
    return f"{what} — {env['device']}, torch {env['torch']}, git {(env.get('git_sha') or '?')[:9]}"


def plot_step(res: dict, path: Path) -> Path | None:
    """Grouped bars: each variant's step time over BP's, per workload; target marks where set."""
    from .step import RATIO_TARGETS

    workloads = res.get("workloads", {})
    if not workloads:
        return None
    plt = _pyplot()
    kind = res["environment"].get("device_type", "cpu")
    mem = any(isinstance(w.get("peak_memory_bytes"), dict) for w in workloads.values())
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(13 if mem else 9, 4.5), squeeze=False)
    variants = ["bp", "dfa", "dfa_fused", "dfa_shared", "tinydfa_style"]
    names = list(workloads)
    width = 0.8 / len(variants)

    def bars(ax, values_of, ylabel):
        for i, v in enumerate(variants):
            xs, ys = [], []
            for k, name in enumerate(names):
                value = values_of(workloads[name]).get(v)
                if value is not None:
                    xs.append(k + (i - (len(variants) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=VARIANT_LABELS[v], color=COLORS[v])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)

    ax = axes[0][0]
    bars(ax, lambda w: w["ratio_over_bp"], "step time / BP step time (lower is faster)")
    full_size = res.get("size") == ("gpu" if kind == "cuda" else "cpu")
    for k, name in enumerate(names):
        bar = RATIO_TARGETS.get((name, kind)) if full_size else None
        if bar is not None:
            ax.plot(
                [k - 0.45, k + 0.45],
                [bar, bar],
                color="orange",
                ls="--",
                lw=1.5,
                label="target" if "target" not in ax.get_legend_handles_labels()[1] else None,
            )
    ax.legend(fontsize=8)
    ax.set_title(f"training step ({res.get('size')} sizes)")
    if mem:
        ax = axes[0][1]
        bars(
            ax,
            lambda w: (
                {v: b / w["peak_memory_bytes"]["bp"] for v, b in w["peak_memory_bytes"].items()}
                if isinstance(w.get("peak_memory_bytes"), dict)
                else {}
            ),
            "peak memory / BP peak memory",
        )
        ax.set_title("peak memory (each variant alone on the device)")
    fig.suptitle(_title(res, "bench_step"), fontsize=10)
    return save_figure(fig, path)


def plot_projection(res: dict, path: Path) -> Path | None:
    """Throughput vs N for each swept shape (GB/s or TFLOP/s with the peak line), and the ratio to
    torch.mm per shape and backend at the zoo's shapes (virtual and stored B, uniform)."""
    rows = res.get("rows", [])
    if not rows:
        return None
    plt = _pyplot()
    dtype = res.get("dtype", rows[0].get("dtype"))
    sweeps = [r for r in rows if r.get("sweep") and r.get("dtype", dtype) == dtype]
    shapes = list(dict.fromkeys(r["shape"] for r in sweeps))
    fig, axes = plt.subplots(1, len(shapes) + 1, figsize=(5.5 * (len(shapes) + 1), 4.5), squeeze=False)
    peak = res.get("peak")
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in sweeps if r["shape"] == shape]
        memory = mine[0]["bound"] == "memory"
        key, unit = ("gbps", "GB/s") if memory else ("tflops", "TFLOP/s")
        for impl, storage in dict.fromkeys((r["impl"], r["storage"]) for r in mine):
            line = sorted((r["N"], r[key]) for r in mine if (r["impl"], r["storage"]) == (impl, storage))
            label = "torch.mm (stored B)" if impl == "torch.mm" else f"{impl} {storage}"
            ax.plot(*zip(*line), marker="o", label=label, ls=":" if impl == "torch.mm" else "-")
        if peak:
            from .common import DTYPE_KEYS

            level = peak["gbps"] if memory else peak["tflops"][DTYPE_KEYS[dtype]]
            ax.axhline(
                level, color="red", ls="--", label=f"peak {'HBM' if memory else DTYPE_KEYS[dtype]} {level:g} {unit}"
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (rows of the error)")
        ax.set_ylabel(f"achieved {unit}")
        K, D = mine[0]["out_features"], mine[0]["D"]
        ax.set_title(f"{shape}: out_features {K}, D {D}, {dtype}" + ("" if peak else " (peak unknown)"), fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    main = [
        r
        for r in rows
        if r["op"] == "project"
        and not r.get("sweep")
        and r["impl"] != "torch.mm"
        and r["distribution"] == "uniform"
        and r.get("dtype", dtype) == dtype
    ]
    cases = list(dict.fromkeys(f"{r['impl']} {r['storage']}" for r in main))
    names = list(dict.fromkeys(r["shape"] for r in main))
    width = 0.8 / max(1, len(cases))
    for i, case in enumerate(cases):
        xs, ys = [], []
        for k, name in enumerate(names):
            for r in main:
                if r["shape"] == name and f"{r['impl']} {r['storage']}" == case:
                    xs.append(k + (i - (len(cases) - 1) / 2) * width)
                    ys.append(r["ratio_vs_mm"])
        ax.bar(xs, ys, width, label=case)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("speed vs torch.mm(e, B) (higher is faster)")
    ax.set_title(f"project, uniform B, {dtype}", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(_title(res, "bench_projection"), fontsize=10)
    return save_figure(fig, path)


def plot_all(results: dict[str, dict], directory: Path) -> list[Path]:
    """{file stem (e.g. "step_cuda"): result} -> the plots written to `directory`."""
    written = []
    for stem, res in results.items():
        fn = plot_step if res.get("benchmark") == "bench_step" else plot_projection
        path = fn(res, Path(directory) / f"{stem}.png")
        if path is not None:
            written.append(path)
    return written
