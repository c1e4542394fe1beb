"""Rewrite the benchmark summary block of README.md from benchmarks/results/{step,projection}_*.json.

    python benchmarks/summarize.py          # only the text between the bench-summary markers changes
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"


def step_table(res: dict) -> list[str]:
    env = res["environment"]
    lines = [f"Training step (`benchmarks/bench_step.py`, {env['device']}, torch {env['torch']}, git "
             f"{(env['git_sha'] or '?')[:9]}, {res['size']} sizes, median of {res['repeats']} interleaved repeats): "
             "ms per step and ratio to BP.", "",
             "| workload | BP | DFA (ours) | DFA fused (ours) | DFA shared layout (ours) | TinyDFA-style | "
             "ours vs TinyDFA-style | peak memory DFA / BP |", "|---|---|---|---|---|---|---|---|"]
    for name, w in res["workloads"].items():
        ms, ratio = w["ms_per_step"], w["ratio_over_bp"]

        def cell(v):
            return f"{ms[v]:.1f} ({ratio[v]:.2f}×)" if v in ms else "—"
        mem = w["peak_memory_bytes"]
        mem = f"{mem['dfa'] / mem['bp']:.2f}" if isinstance(mem, dict) else "not measured"
        lines.append(f"| {name} | {ms['bp']:.1f} | {cell('dfa')} | {cell('dfa_fused')} | {cell('dfa_shared')} | "
                     f"{cell('tinydfa_style')} | "
                     f"{w['speedup_over_tinydfa_style']:.2f}× | {mem} |")
    return lines


def projection_table(res: dict) -> list[str]:
    env = res["environment"]
    rows = [r for r in res["rows"] if not r.get("sweep") and r["op"] == "project" and r["impl"] != "torch.mm"]
    lines = [f"Projection (`benchmarks/bench_projection.py`, {env['device']}, {res['dtype']}): speed relative to "
             "`torch.mm(e, B) * scale` on a stored B in the same run (> 1 = faster); % of the device peak "
             "(HBM bandwidth when out_features ≤ 16, else the dtype's FLOP/s) where the peak is known.", "",
             "| shape (N, out_features, D) | backend | materialized | virtual uniform | virtual rademacher | "
             "virtual gaussian | % peak (virtual uniform) |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["shape"], r["N"], r["out_features"], r["D"], r["impl"]) for r in rows},
                  key=lambda k: (k[2], k[0], k[4]))
    for shape, N, K, D, impl in keys:
        cells = {}
        for r in rows:
            if (r["shape"], r["impl"]) == (shape, impl):
                cells[(r["storage"], r["distribution"])] = r
        def ratio(s, d):
            return f"{cells[(s, d)]['ratio_vs_mm']:.2f}×" if (s, d) in cells else "—"
        vu = cells.get(("virtual", "uniform"), {})
        pct = vu.get("pct_peak_bw" if vu.get("bound") == "memory" else "pct_peak_flops")
        lines.append(f"| {shape} ({N}, {K}, {D}) | {impl} | {ratio('materialized', 'uniform')} | "
                     f"{ratio('virtual', 'uniform')} | {ratio('virtual', 'rademacher')} | {ratio('virtual', 'gaussian')} | "
                     f"{'—' if pct is None else f'{pct:.0f}%'} |")
    points = [r for r in res["rows"] if r["op"] == "project_points"]
    if points:
        lines += ["", "project_points (every point's gradient with GELU's derivative fused) vs project + slicing "
                  "+ the derivative in torch: " + ", ".join(
                      f"{r['impl']} {r['storage']} {r['ratio_vs_unfused']:.2f}×" for r in points) + "."]
    return lines


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    block = []
    for path in sorted(results.glob("step_*.json")):
        block += step_table(json.loads(path.read_text())) + [""]
    for path in sorted(results.glob("projection_*.json")):
        block += projection_table(json.loads(path.read_text())) + [""]
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"README.md has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + "\n".join(block).rstrip() + "\n" + END + tail)
    print(f"README.md: benchmark summary rewritten from {len(list(results.glob('*_*.json')))} result files")


if __name__ == "__main__":
    main()
