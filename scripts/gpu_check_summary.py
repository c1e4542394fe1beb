"""The summary of a scripts/gpu_check.sh run: WORK/summary.json, WORK/summary.txt and the same text
printed, which alone (the last 12,000 characters of a device run's output) must say what passed,
failed (with the test ids), timed out and measured.

Reads what the stages left in the work folder (stages.jsonl, versions.json, build_info.json, the
tests' log, the step and projection JSON), draws the plots the benchmarks did not, and records the
machine, the versions and the git SHA. Exit status 1 when a stage did not pass.

    python scripts/gpu_check_summary.py WORK [--dry-run] [--budget S] [--elapsed S] [--bench-autotune 0|1]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

MAX_LISTED = 20  # failing ids printed (summary.json has them all); fewer if the text would not fit
MAX_TEXT = 10_000  # characters of the printed summary: the device sends back the last 12,000 of output
OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
_RESULT = "|".join(OUTCOMES)
# `pytest -v`: "tests/a.py::test_x[p] PASSED    [ 50%]" (with -rs, "SKIPPED (reason) [ 50%]"); with
# pytest-xdist: "[gw3] [ 50%] PASSED tests/a.py::test_x[p]"; both print the bare id when a test starts
_PLAIN = re.compile(rf"^(?P<id>tests/\S+?::.+?) (?P<res>{_RESULT})(?: \(.*\))?(?:\s+\[\s*\d+%\])?\s*$")
_XDIST = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] (?P<res>{_RESULT}) (?P<id>tests/\S+?::.+?)\s*$")
_SHORT = re.compile(r"^(?P<res>FAILED|ERROR) (?P<id>tests/\S+?::.+?)(?: - (?P<msg>.*))?$")
_STARTED = re.compile(r"^(?P<id>tests/\S+?::.+?)\s*$")
_CRASH = re.compile(r"worker '?(gw\d+)'? crashed while running '?(?P<id>tests/[^']+?)'?\s*$")
_FINAL = re.compile(
    r"^=+ (?P<line>.*\b(?:passed|failed|skipped|error|errors|deselected|collected|no tests ran)\b.*"
    r" in [\d.]+s.*?) =+$"
)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_results(text: str) -> dict:
    """Outcomes from a pytest log (-v, with or without pytest-xdist, or --collect-only -q), complete
    or cut by the stage's time limit: counts, the failing ids with their messages, what was selected
    and not run, the test running when a non-xdist run was cut, skip reasons and the slowest tests."""
    outcome: dict[str, str] = {}
    messages: dict[str, str] = {}
    started: dict[str, None] = {}  # -v prints an id when its test starts (xdist too), its outcome when it ends
    for line in text.splitlines():
        m = _PLAIN.match(line) or _XDIST.match(line)
        if m:
            old = outcome.get(m["id"])
            # a failure stays a failure; a pass followed by a teardown error counts as the error
            outcome[m["id"]] = old if old in ("FAILED", "ERROR") else m["res"]
            continue
        m = _SHORT.match(line)
        if m:
            outcome.setdefault(m["id"], m["res"])
            if m["msg"] and m["id"] not in messages:  # (a worker's crash is described better below)
                messages[m["id"]] = m["msg"][:200]
            continue
        m = _CRASH.search(line)
        if m:
            outcome[m["id"]] = "FAILED"
            messages[m["id"]] = f"worker {m.group(1)} crashed (a hang ended by the per-test timeout, or a fatal error)"
            continue
        m = _STARTED.match(line)
        if m:
            started[m["id"]] = None
    counts = Counter(outcome.values())
    res = {k.lower(): counts.get(k, 0) for k in OUTCOMES}
    m = re.search(r"(\d+) workers \[(\d+) items?\]", text)
    selected = int(m.group(2)) if m else None
    m = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
    if m and selected is None:
        selected = int(m.group(3) or (int(m.group(1)) - int(m.group(2) or 0)))
    m = re.search(r"^(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", text, re.M)
    if m:  # --collect-only -q
        res["collected_only"] = True
        selected = int(m.group(1))
    res["selected"] = selected
    res["ran"] = len(outcome)
    res["not_run"] = None if selected is None or res.get("collected_only") else max(0, selected - len(outcome))
    finals = [m["line"] for m in map(_FINAL.match, text.splitlines()) if m]
    res["final_line"] = finals[-1] if finals else "none: cut by the time limit before pytest's summary"
    res["interrupted"] = "KeyboardInterrupt" in text or not finals
    # (a --collect-only listing is ids alone: none of them ran)
    res["running_when_cut"] = [] if res.get("collected_only") else [i for i in started if i not in outcome]
    res["failures"] = [
        {"id": i, "outcome": o, "message": messages.get(i, "")}
        for i, o in outcome.items()
        if o in ("FAILED", "ERROR", "XPASS")
    ]
    reasons: Counter = Counter()  # -rs lists one line per test location: summed per reason here
    for n, _, reason in re.findall(r"^SKIPPED \[(\d+)\] (\S+?): (.*)$", text, re.M):
        reasons[reason[:200]] += int(n)
    res["skip_reasons"] = [{"count": n, "reason": r} for r, n in reasons.most_common()]
    res["slowest"] = [f"{t}s {i}" for t, i in re.findall(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S.*)$", text, re.M)][
        :8
    ]
    res["rules"] = re.findall(r"^\s+(\d+)\s+(tests/\S+)$", text, re.M)
    res["subset_problems"] = re.findall(r"^gpu subset PROBLEM: (.*)$", text, re.M)
    return res


def _git_sha() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
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
            best[key] = {
                "ratio": round(ratio, 3),
                "backend": r["impl"],
                "storage": r["storage"],
                "ms": round(r["ms"], 4),
                "pct_peak": None if r.get("pct_peak") is None else round(r["pct_peak"], 1),
            }
    return {
        "rows": len(rows),
        "best": best,
        "targets": res.get("targets", []),
        "skipped": len(res.get("skipped", [])),
        "failed": res.get("failed", []),
        "dtypes": res.get("dtypes"),
    }


def _step_digest(res: dict) -> dict:
    out = {}
    for name, w in res.get("workloads", {}).items():
        mem = w.get("peak_memory_ratio_over_bp")
        out[name] = {
            "ms_per_step": {v: round(t, 3) for v, t in w["ms_per_step"].items()},
            "ratio_over_bp": {v: round(t, 3) for v, t in w["ratio_over_bp"].items()},
            "flop_ratio_over_bp": {v: round(t, 3) for v, t in w.get("flops", {}).get("flop_ratio_over_bp", {}).items()},
            "peak_memory_ratio_over_bp": None if mem is None else {v: round(t, 3) for v, t in mem.items()},
            "backends": w.get("dfa_backends"),
            "failed_variants": w.get("failed_variants", {}),
            "repeats_done": w.get("repeats_done"),
        }
    return {
        "size": res.get("size"),
        "workloads": out,
        "skipped": res.get("skipped", {}),
        "targets": res.get("targets", []),
    }


def _plots(work: Path, results: dict) -> list[str]:
    """PNG beside each result JSON that has rows to draw (the benchmarks draw none themselves here)."""
    drawn = []
    try:
        from dfa_kernels.bench import plots
    except Exception as err:  # noqa: BLE001 - the summary still goes out
        return [f"no plots: {type(err).__name__}: {err}"]
    for path, (res, kind) in results.items():
        png = path.with_suffix(".png")
        try:
            if (plots.plot_step if kind == "step" else plots.plot_projection)(res, png) is not None:
                drawn.append(png.name)
        except Exception as err:  # noqa: BLE001 - matplotlib missing, or a partial result
            drawn.append(f"{png.name} not drawn: {type(err).__name__}: {str(err)[:100]}")
    return drawn


def _fmt_tests(name: str, t: dict, listed: int = MAX_LISTED) -> list[str]:
    if t.get("collected_only"):
        lines = [f"{name}: {t['selected']} tests selected by the subset (collected only: a dry run)"]
        lines += [f"  {n:>5} {rule}" for n, rule in t["rules"]]
        lines += [f"  SUBSET PROBLEM: {x}" for x in t["subset_problems"]]
        return lines
    not_run = "" if not t["not_run"] else f", {t['not_run']} NOT RUN (cut by the time limit)"
    lines = [
        f"{name}: {t['selected']} selected; {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
        f"{t['skipped']} skipped{not_run}",
        f"  pytest: {t['final_line']}",
    ]
    for i in t["running_when_cut"][:listed]:
        lines.append(f"  RUNNING when cut: {i[:160]}")
    for f in t["failures"][:listed]:
        lines.append(f"  {f['outcome']} {f['id'][:160]}" + (f" - {f['message'][:120]}" if f["message"] else ""))
    if len(t["failures"]) > listed:
        lines.append(f"  ... and {len(t['failures']) - listed} more (summary.json, tests.log)")
    for s in t["skip_reasons"][:6]:
        lines.append(f"  skipped [{s['count']}] {s['reason'][:150]}")
    if t["slowest"]:
        lines.append("  slowest: " + "; ".join(s[:90] for s in t["slowest"][:5]))
    return lines


def _fmt_step(d: dict) -> list[str]:
    lines = []
    for w, r in d["workloads"].items():
        lines.append(
            f"{w} ({r['repeats_done']} repeats; backends {r['backends']}): ms/step, / BP: time, FLOPs, peak memory"
        )
        for v, ms in r["ms_per_step"].items():
            mem = (r["peak_memory_ratio_over_bp"] or {}).get(v)
            lines.append(
                f"  {v:<14}{ms:>10.3f} ms {r['ratio_over_bp'][v]:>7.3f}x "
                f"{r['flop_ratio_over_bp'].get(v, float('nan')):>7.3f}x " + ("" if mem is None else f"{mem:>7.3f}x")
            )
        for v, why in r["failed_variants"].items():
            lines.append(f"  {v} FAILED: {why[:200]}")
    for w, why in d["skipped"].items():
        lines.append(f"{w}: NOT RUN ({why[:200]})")
    for t in d["targets"]:
        lines.append(
            f"  target {t['name']}: {t['value']:.3f} ({t['variant']}) {t['target']}: {'met' if t['met'] else 'NOT met'}"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=int, default=None, help="seconds the run was allowed (stages + summary)")
    p.add_argument("--elapsed", type=int, default=None, help="seconds the stages took")
    p.add_argument("--bench-autotune", default="0")
    a = p.parse_args(argv)
    work = a.work
    stages = (
        [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines() if line.strip()]
        if (work / "stages.jsonl").exists()
        else []
    )
    versions = _json(work / "versions.json") or {}
    info = _json(work / "build_info.json") or {}
    device = "cpu" if a.dry_run else "cuda"
    results = {}
    steps = {}
    for label, fname in (("step", "step_mlp_dcn.json"), ("lm", "step_lm.json")):
        res = _json(work / fname)
        if res is not None:
            steps[label] = _step_digest(res)
            results[work / fname] = (res, "step")
    projection_path = next(iter(sorted(work.glob(f"projection_{device}*.json"))), None)
    projection = _json(projection_path) if projection_path else None
    if projection is not None:
        results[projection_path] = (projection, "projection")
    tests = test_results((work / "tests.log").read_text(errors="replace")) if (work / "tests.log").exists() else None
    summary = {
        "dry_run": a.dry_run,
        "git_sha": _git_sha(),
        "device": versions.get("gpu") or device,
        "versions": versions,
        "build": {
            k: info.get(k)
            for k in (
                "extension_loaded",
                "extension_error",
                "cuda_compiled",
                "cuda_archs",
                "grouped_gemm",
                "self_test",
                "backends",
                "warnings",
            )
        },
        "stages": stages,
        "budget_s": a.budget,
        "elapsed_s": a.elapsed,
        "triton_autotune": {"tests": "0", "benchmarks": a.bench_autotune},
        "tests": tests,
        "step": steps,
        "projection": _projection_digest(projection) if projection else None,
        "plots": _plots(work, results),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    v = versions
    head = "dry run, CPU" if a.dry_run else f"{summary['device']} sm_{v.get('capability')}, {v.get('sms')} SMs"
    lines = [
        f"=== gpu_check summary ({head}; git {summary['git_sha']}) ===",
        f"versions: python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), "
        f"triton {v.get('triton')}, nvcc {v.get('nvcc')}, driver/GPU {v.get('nvidia-smi')}",
    ]
    if info:
        lines.append(
            f"build: extension loaded {info.get('extension_loaded')}, CUDA kernels {info.get('cuda_compiled')} "
            f"for {info.get('cuda_archs')}; grouped GEMM {info.get('grouped_gemm')}; "
            f"backends {info.get('backends')}"
        )
        if info.get("self_test"):
            lines.append(f"self-test: {str(info['self_test'])[:300]}")
        for w in info.get("warnings") or []:
            lines.append(f"WARNING: {str(w)[:300]}")
        if info.get("extension_error"):
            lines.append(f"extension error: {str(info['extension_error'])[:300]}")
    lines.append("stages (limit: the stage's base, plus the seconds earlier stages left for tests and lm):")
    for s in stages:
        lines.append(
            f"  {s['stage']:<11}{s['status'].upper() if s['status'] != 'ok' else 'ok':<8}"
            f"{s['seconds']:>5} s of {s['limit_s']:>4} (base {s['base_s']}, rc {s['rc']})"
        )
    if a.elapsed is not None:
        lines.append(f"  all stages: {a.elapsed} s; budget {a.budget} s with the summary")
    tests_at = len(lines)
    autotune = (
        "autotuned" if a.bench_autotune == "1" else "each Triton kernel at its fixed config (DFA_TRITON_AUTOTUNE=0)"
    )
    for label, d in steps.items():
        lines.append(f"{label} ({d['size']} size, {autotune}):")
        lines += ["  " + x for x in _fmt_step(d)]
    pj = summary["projection"]
    if pj:
        lines.append(
            f"projection (quick, {pj['dtypes']}, {autotune}): {pj['rows']} rows, {pj['skipped']} not "
            f"measured (time budget), {len(pj['failed'])} failed"
        )
        for key, b in pj["best"].items():
            pct = "" if b["pct_peak"] is None else f", {b['pct_peak']}% of peak"
            lines.append(f"  {key:<42} {b['ratio']:>7.2f}x ({b['backend']}, {b['storage']}, {b['ms']} ms{pct})")
        for t in pj["targets"]:
            lines.append(
                f"  target {t['name']}: {t['value']:.2f} ({t['backend']}) {t['target']}: "
                f"{'met' if t['met'] else 'NOT met'}"
            )
        for f in pj["failed"][:10]:
            lines.append(f"  FAILED {f[:200]}")
    bad = [s["stage"] for s in stages if s["status"] != "ok"]
    lines.append(
        "verdict: "
        + ("every stage passed" if stages and not bad else "NOT passed: " + ", ".join(bad or ["no stage ran"]))
        + f"; plots: {', '.join(summary['plots']) or 'none'}"
    )
    listed = MAX_LISTED
    while True:  # the test lines go where they belong, with as many failing ids as fit
        text = (
            "\n".join(lines[:tests_at] + (_fmt_tests("tests", tests, listed) if tests else []) + lines[tests_at:])
            + "\n"
        )
        if len(text) <= MAX_TEXT or listed == 0:
            break
        listed = max(0, listed - 5)
    (work / "summary.txt").write_text(text)
    print("\n" + text, end="")
    return 0 if stages and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
