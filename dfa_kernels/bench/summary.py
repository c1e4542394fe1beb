"""The docs' benchmark summary (``docs/benchmarks.md``): tables generated from the results JSON,
written between the markers ``<!-- bench-summary:start -->`` and ``<!-- bench-summary:end -->``
(nothing else changes). ``benchmarks/summarize.py`` runs it; ``dfa-kernels bench`` calls it after a
full run."""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"
PAGE = Path("docs") / "benchmarks.md"  # relative to the checkout
# where the docs site serves benchmarks/plots/ (docs/_hooks/plots.py), relative to PAGE
PLOTS_LINK = "plots"
OURS = ("dfa", "dfa_fused")


def load_results(directory: Path) -> dict[str, dict]:
    """{file stem: result} for step_*.json and projection_*.json, GPU files first; quick and
    smoke-test runs (*_quick.json, *_tiny.json) are left out of the summary."""
    found = {}
    for path in sorted(
        Path(directory).glob("*.json"), key=lambda p: ("cpu" in p.stem, not p.stem.startswith("step_"), p.stem)
    ):
        if not path.stem.startswith(("step_", "projection_")) or path.stem.endswith(("_quick", "_tiny")):
            continue
        found[path.stem] = json.loads(path.read_text())
    return found


def _env_line(res: dict) -> str:
    env = res["environment"]
    m = env.get("machine") or {}
    where = env["device"]
    if env.get("device_type") == "cpu" and m:
        where = (
            f"{m.get('cpu_model', where)}, {m.get('cpu_cores')} cores, {m.get('torch_threads')} threads, "
            f"**{(m.get('cpu_isa') or '?').upper()} path**"
        )
    elif m.get("gpu_driver"):
        where += f", driver {m['gpu_driver']}"
    return (
        f"{where}, torch {env['torch']}"
        + (f", triton {env['triton']}" if env.get("triton") and env.get("device_type") == "cuda" else "")
        + f", git {(env.get('git_sha') or '?')[:9]}, {env['date'][:10]}"
    )


def _targets(targets: list[dict]) -> list[str]:
    if not targets:
        return []
    return [
        "",
        "Targets: "
        + "; ".join(
            f"{t['name']} = {t['value']:.3f} ({t.get('variant') or t.get('backend')}"
            + (f", FLOP ratio {t['flop_ratio']:.3f}" if t.get("flop_ratio") is not None else "")
            + f"), {t['target']}: "
            f"**{'met' if t['met'] else 'not met'}**"
            for t in targets
        )
        + ".",
    ]


def step_table(res: dict) -> list[str]:
    timing = res.get("timing", {})
    lines = [
        f"Training step (`benchmarks/bench_step.py`, {_env_line(res)}, {res['size']} sizes, "
        f"{'minimum' if res.get('statistic') == 'min' else 'median'} of "
        f"{res['repeats']} interleaved repeats"
        + (f" of {timing['repeats']} batches" if timing else "")
        + "): ms per step and ratio to BP; peak memory on a GPU with each variant alone on the device.",
        "",
        "| workload | BP | DFA unfused (ours) | DFA fused (ours) | DFA shared layout (ours) | TinyDFA-style | "
        "ideal hand-written DFA | ours vs TinyDFA-style | ours / ideal | FLOPs ours / BP | peak memory DFA / BP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, w in res["workloads"].items():
        ms, ratio = w["ms_per_step"], w["ratio_over_bp"]
        ours = (w.get("ours") or {}).get("variant") or min((v for v in OURS if v in ms), key=ms.get, default=None)

        def cell(v, ms=ms, ratio=ratio, ours=ours):
            if v not in ms:
                return "—"
            text = f"{ms[v]:.1f} ({ratio[v]:.2f}×)"
            return f"**{text}**" if v == ours else text

        mem = w["peak_memory_bytes"]
        mem = (
            f"{mem[ours] / mem['bp']:.2f} ({mem[ours] / 2**30:.2f} / {mem['bp'] / 2**30:.2f} GiB)"
            if isinstance(mem, dict) and ours in mem
            else "not measured"
        )
        speedup = w.get("speedup_over_tinydfa_style")
        flop_ratio = w.get("flops", {}).get("flop_ratio_over_bp", {}).get(ours)
        over_ideal = w.get("ratio_over_ideal_sketch")
        lines.append(
            f"| {name} | {ms['bp']:.1f} | {cell('dfa')} | {cell('dfa_fused')} | {cell('dfa_shared')} | "
            f"{cell('tinydfa_style')} | {cell('ideal_sketch')} | {'—' if speedup is None else f'{speedup:.2f}×'} | "
            f"{'—' if over_ideal is None else f'{over_ideal:.2f}×'} | "
            f"{'—' if flop_ratio is None else f'{flop_ratio:.2f}'} | {mem} |"
        )
        for v, why in w.get("failed_variants", {}).items():
            notes.append(f"{name} {v} failed ({why})")
        data = w.get("config", {}).get("data")
        if data and name in ("gcn", "dcn"):
            notes.append(f"{name}: {data}")
    lines += [
        "",
        'Bold: "DFA (ours)", the faster of unfused and fused (same feedback as TinyDFA-style); ideal '
        "hand-written DFA: the same step in plain torch with no autograd, optimizer object or library (the "
        "least a DFA step must do). "
        "FLOPs (matmuls, attention and our ops, by `torch.utils.flop_counter`): the time ratio a "
        "compute-bound device reaches at best." + (" " + "; ".join(notes) + "." if notes else ""),
    ]
    gpu_flops = res.get("flops_at_gpu_size", {})
    if gpu_flops:
        lines.append(
            "FLOPs / BP at the GPU sizes (the GPU step targets' compute bound): "
            + "; ".join(
                f"{name} " + ", ".join(f"{v} {r:.2f}" for v, r in f["flop_ratio_over_bp"].items() if v != "bp")
                for name, f in gpu_flops.items()
            )
            + "."
        )
    if res.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items()) + ".")
    return lines + _targets(res.get("targets", []))


def projection_table(res: dict) -> list[str]:
    rows = [r for r in res["rows"] if not r.get("sweep") and r["op"] == "project" and r["impl"] != "torch.mm"]
    first = res.get("dtype", "float32")
    peak = res.get("peak")
    lines = [
        f"Projection (`benchmarks/bench_projection.py`, {_env_line(res)}): speed relative to "
        "`torch.mm(e * scale, B)` on a stored B of e's dtype in the same run (> 1 = faster); "
        "% of the device peak"
        + (
            f" ({peak['name']}: HBM {peak['gbps']:g} GB/s when out_features ≤ 16, else "
            "the dtype's dense tensor-core TFLOP/s, TF32 for float32)"
            if peak
            else " (unknown for this device)"
        )
        + ".",
        "",
        "| shape (N, out_features, D) | dtype | backend | materialized | virtual uniform | virtual rademacher | "
        "virtual gaussian | virtual sparse | % peak (virtual uniform) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = list(
        dict.fromkeys((r["shape"], r["N"], r["out_features"], r["D"], r.get("dtype", first), r["impl"]) for r in rows)
    )
    keys.sort(key=lambda k: (k[4] != first, k[2], k[0], k[5]))
    for shape, N, K, D, dtype, impl in keys:
        cells = {
            (r["storage"], r["distribution"]): r
            for r in rows
            if (r["shape"], r.get("dtype", first), r["impl"]) == (shape, dtype, impl)
        }

        def ratio(s, d, cells=cells):
            return f"{cells[(s, d)]['ratio_vs_mm']:.2f}×" if (s, d) in cells else "—"

        vu = cells.get(("virtual", "uniform"), {})
        pct = vu.get("pct_peak", vu.get("pct_peak_bw" if vu.get("bound") == "memory" else "pct_peak_flops"))
        lines.append(
            f"| {shape} ({N}, {K}, {D}) | {dtype} | {impl} | {ratio('materialized', 'uniform')} | "
            f"{ratio('virtual', 'uniform')} | {ratio('virtual', 'rademacher')} | "
            f"{ratio('virtual', 'gaussian')} | {ratio('virtual', 'sparse')} | "
            f"{'—' if pct is None else f'{pct:.0f}%'} |"
        )
    points = [r for r in res["rows"] if r["op"] == "project_points"]
    if points:
        older = any(r["shape"] == "points_gelu" for r in points)  # results of the first version of the benchmark
        baseline = (
            "project, slicing and f'(a) multiplied in fp32 in torch"
            if older
            else "one project with per-column scales, slicing and the activation's backward in torch"
        )
        lines += [
            "",
            f"project_points (every point's gradient, activation derivative fused) vs {baseline}: "
            + ", ".join(
                f"{r['shape'].removeprefix('points_')} ({r['N']}, {r['out_features']}, {r['D']}) "
                f"{r.get('dtype', first)} {r['impl']} {r['storage']} {r['ratio_vs_unfused']:.2f}×"
                for r in points
            )
            + ".",
        ]
    if res.get("skipped"):
        lines.append(f"Not measured (time budget): {len(res['skipped'])} measurements.")
    if res.get("failed"):
        lines.append("Failed: " + "; ".join(res["failed"]) + ".")
    return lines + _targets(res.get("targets", []))


def render(results: dict[str, dict], plots_dir: Path | None = None, plots_link: str = PLOTS_LINK) -> str:
    """The summary block; each result's plot in `plots_dir`, when there, linked as plots_link/STEM.png."""
    block = []
    for stem, res in results.items():
        block += (step_table(res) if res.get("benchmark") == "bench_step" else projection_table(res)) + [""]
        if plots_dir is not None and (Path(plots_dir) / f"{stem}.png").exists():
            block += [f"![{stem}]({plots_link}/{stem}.png)", ""]
    return "\n".join(block).rstrip() + "\n"


def rewrite_block(page: Path, block: str, start: str = START, end: str = END) -> None:
    """Replace what lies between the markers (exclusive) with `block`; nothing else changes."""
    text = Path(page).read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{page} needs exactly one {start} ... {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(page).write_text(head + start + "\n" + block + end + tail)


def summarize(root: Path, plots: bool = True) -> int:
    """Re-plot from root/benchmarks/results/*.json into root/benchmarks/plots/ and rewrite
    root/docs/benchmarks.md's marked block; returns the number of result files used."""
    root = Path(root)
    results = load_results(root / "benchmarks" / "results")
    plots_dir = root / "benchmarks" / "plots"
    if plots:
        try:
            from .plots import plot_all

            plot_all(results, plots_dir)
        except ImportError as err:  # matplotlib missing: the tables still get written
            print(f"plots not drawn: {err}")
    rewrite_block(root / PAGE, render(results, plots_dir))
    return len(results)
