"""The summary of a scripts/gpu_check.sh run: OUT/summary.json and a printed digest.

Reads what the stages left in OUT (stages.jsonl, build_info.json, the tests' log, the projection
and step JSON), draws the plots the benchmarks did not, and records the machine, the versions and
the git SHA. Exit status 1 when a stage did not pass.

    python scripts/gpu_check_summary.py OUT [--dry-run]
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _test_counts(log: Path) -> dict:
    """Outcome counts from a pytest -v (or --collect-only) log; complete or cut by the time limit."""
    if not log.exists():
        return {}
    text = log.read_text(errors="replace")
    counts = {k: len(re.findall(rf"^\S+::\S.* {k.upper()}\b", text, re.M)) for k in ("passed", "failed", "skipped", "error")}
    collected = re.search(r"(\d+) tests? collected", text)
    if collected:
        counts["collected"] = int(collected.group(1))
    final = re.findall(r"^(?:=+ )?(.*(?:passed|failed|skipped|error|collected|deselected).*) in [\d.]+s", text, re.M)
    counts["final_line"] = final[-1] if final else "none (cut by the time limit?)"
    counts["failures"] = re.findall(r"^FAILED (\S+)", text, re.M)[:20]
    return counts


def _git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _projection_digest(res: dict) -> dict:
    rows = res.get("rows", [])
    best = {}
    for r in rows:  # the best ratio per (shape, dtype, op) and who got it
        if r["impl"] == "torch.mm" or r.get("sweep"):
            continue
        key = f"{r['op']} {r['shape']} {r['dtype']}"
        ratio = r.get("ratio_vs_mm", r.get("ratio_vs_unfused"))
        if key not in best or ratio > best[key]["ratio"]:
            best[key] = {"ratio": round(ratio, 3), "backend": r["impl"], "storage": r["storage"],
                         "pct_peak": None if r.get("pct_peak") is None else round(r["pct_peak"], 1)}
    return {"rows": len(rows), "best": best, "targets": res.get("targets", []), "skipped": len(res.get("skipped", [])),
            "failed": res.get("failed", []), "backend_table": res.get("backend_table")}


def _step_digest(res: dict) -> dict:
    out = {}
    for name, w in res.get("workloads", {}).items():
        mem = w.get("peak_memory_ratio_over_bp")
        out[name] = {"ms_per_step": {v: round(t, 3) for v, t in w["ms_per_step"].items()},
                     "ratio_over_bp": {v: round(t, 3) for v, t in w["ratio_over_bp"].items()},
                     "flop_ratio_over_bp": {v: round(t, 3) for v, t in w.get("flops", {}).get("flop_ratio_over_bp", {}).items()},
                     "peak_memory_ratio_over_bp": None if mem is None else {v: round(t, 3) for v, t in mem.items()},
                     "backends": w.get("dfa_backends"), "failed_variants": w.get("failed_variants", {})}
    return {"workloads": out, "skipped": res.get("skipped", {}), "targets": res.get("targets", [])}


def _plots(out: Path, projection: dict | None, projection_path: Path | None, step: dict | None, step_path: Path) -> list[str]:
    drawn = []
    try:
        from dfa_kernels.bench import plots
    except Exception as err:  # noqa: BLE001 - the summary still goes out
        return [f"no plots: {type(err).__name__}: {err}"]
    for res, path, fn in ((projection, projection_path, plots.plot_projection), (step, step_path, plots.plot_step)):
        if res is None or path is None:
            continue
        png = path.with_suffix(".png")
        if png.exists():
            drawn.append(png.name)
            continue
        try:
            fn(res, png)
            drawn.append(png.name)
        except Exception as err:  # noqa: BLE001 - matplotlib missing, or a partial result
            drawn.append(f"{png.name} not drawn: {type(err).__name__}: {err}")
    return drawn


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in args
    out = Path([a for a in args if a != "--dry-run"][0])
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "stages.jsonl").exists() else []
    info = _json(out / "build_info.json")
    device = "cpu" if dry else "cuda"
    projection_path = next((p for p in sorted(out.glob(f"projection_{device}*.json"))), None)
    projection = _json(projection_path) if projection_path else None
    step_path = out / f"step_{device}.json"
    step = _json(step_path)
    summary = {
        "dry_run": dry,
        "git_sha": _git_sha(),
        "device": (info or {}).get("gpu") or device,
        "versions": {k: (info or {}).get(k) for k in ("torch", "torch_cuda", "triton", "cuda_archs", "grouped_gemm")},
        "warnings": (info or {}).get("warnings"),
        "stages": stages,
        "tests": _test_counts(out / "tests.log"),
        "sync": _test_counts(out / "sync.log"),
        "projection": _projection_digest(projection) if projection else None,
        "step": _step_digest(step) if step else None,
        "plots": _plots(out, projection, projection_path, step, step_path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\n=== gpu_check summary ({'dry run, CPU' if dry else summary['device']}; git {summary['git_sha']}) ===")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    for w in summary["warnings"] or []:
        print(f"WARNING: {w}")
    for s in stages:
        extra = f" ({s['seconds']} s of {s['limit_s']})" if "seconds" in s else f" ({s.get('why')})"
        print(f"stage {s['stage']:<11}{s['status']}{extra}")
    for name in ("tests", "sync"):
        t = summary[name]
        if t:
            print(f"{name}: {t['final_line']}; lines: {t['passed']} passed, {t['failed']} failed, "
                  f"{t['skipped']} skipped, {t['error']} errors" + "".join(f"\n  FAILED {f}" for f in t["failures"]))
    if summary["projection"]:
        p = summary["projection"]
        print(f"projection: {p['rows']} rows, {p['skipped']} skipped, {len(p['failed'])} failed")
        for key, b in p["best"].items():
            pct = "" if b["pct_peak"] is None else f", {b['pct_peak']}% of peak"
            print(f"  {key:<40} {b['ratio']:>6.2f}x ({b['backend']}, {b['storage']}{pct})")
        for t in p["targets"]:
            print(f"  target {t['name']}: {t['value']:.2f} ({t['backend']}) {t['target']}: {'met' if t['met'] else 'NOT met'}")
    if summary["step"]:
        for name, w in summary["step"]["workloads"].items():
            print(f"step {name}: " + ", ".join(f"{v} {ms} ms ({w['ratio_over_bp'][v]}x BP, FLOPs "
                                               f"{w['flop_ratio_over_bp'].get(v, '?')}x)" for v, ms in w["ms_per_step"].items()))
            if w["peak_memory_ratio_over_bp"]:
                print(f"  peak memory / BP: {w['peak_memory_ratio_over_bp']}")
        for name, why in summary["step"]["skipped"].items():
            print(f"step {name}: skipped ({why})")
    print(f"files in {out}: summary.json, " + ", ".join(summary["plots"]))
    return 0 if stages and all(s["status"] == "ok" for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
