"""The LM ablations of issue 20: what moves DFA's loss, and what only moves shallow's.

The zoo's LM comparison (`lm-shakespeare`, preset "cpu") differs from paper 1's recipe in the head's
learning rate (100x the body's for DFA), the architecture (pre-LN, learned positions) and the
budget. This script trains BP, DFA (macro placement, the paper's feedback) and shallow, seeds 0, 1,
2, under each change, on one CPU thread per run:

- "cpu": the zoo's preset as it is (the reference);
- "cpu-tied" (a): one learning rate for every parameter in every mode, tuned on one grid for
  every mode (the recipe's TIED_GRID, seed 0, validation loss); its BP and shallow are the "cpu"
  preset's runs (those two presets differ only in DFA's head rate: BP and shallow were tied already);
- "cpu-paper" (b): "cpu-tied" with paper 1's architecture (post-LN, sinusoidal positions,
  embeddings times sqrt(d), ReLU, head bias, its initialisation), retuned on the same grid;
- (c) a budget ladder: the cosine runs of "cpu" and "cpu-paper" at 150 (cpu) / 600 / 1200 steps
  besides 300, each budget its own runs (the cosine schedule spans the run), with the 300-step
  winners' rates; a probe at the top budget (seed 0, validation only, choosing nothing) checks each
  winner against the rates one grid step lower (3e-3 -> 1e-3).

Every run is one command, `python benchmarks/lm_ablations.py one ...`, which writes
benchmarks/results/zoo/lm_ablations/runs/PRESET/NAME.json (its config, history, final metrics,
alignment for DFA, the git SHA and that exact command). `run` launches the missing ones (`--jobs`
at once, lower CPU priority), in an order where the runs that others depend on come first, and is
resumable: a run whose JSON exists is not run again. `report` writes the tuning reports
(tuning-PRESET.json, in `dfa-kernels tune`'s format) and summary.{json,md}: per preset and budget,
BP / DFA / shallow test loss (mean +- std over seeds), the gaps in nats and the fraction of the
shallow-to-BP gap DFA closes.

    python benchmarks/lm_ablations.py plan            # every run and whether it is done
    python benchmarks/lm_ablations.py run --jobs 2    # the missing ones
    python benchmarks/lm_ablations.py report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "zoo" / "lm_ablations"
TASK = "lm-shakespeare"
MODES = ("bp", "dfa", "shallow")
SEEDS = (0, 1, 2)
STEPS_PER_EPOCH = 50  # the cpu presets' (one validation pass every 50 steps)
BASE_STEPS = 300  # the cpu presets' budget (6 epochs)
TUNED_PRESETS = ("cpu-tied", "cpu-paper")  # tuned here on the recipe's TIED_GRID
LADDER = {"cpu": (150, 600, 1200), "cpu-paper": (600, 1200)}
PROBE_STEPS = 1200  # the ladder's top: each 300-step winner against a lower rate
LABELS = {
    "cpu": "ours (cpu preset: pre-LN, learned positions; DFA head 1e-2)",
    "cpu-tied": "(a) one rate for every parameter",
    "cpu-paper": "(b) one rate + paper 1's architecture",
}


# ---------------------------------------------------------------- runs
def run_preset(preset: str, mode: str) -> str:
    """The preset a run is stored under: cpu-tied's BP and shallow are the cpu preset's runs."""
    return "cpu" if preset == "cpu-tied" and mode != "dfa" else preset


def spec(preset, mode, lr, head_lr, steps, seed) -> dict:
    return dict(
        preset=run_preset(preset, mode),
        mode=mode,
        lr=float(lr),
        head_lr=float(head_lr),
        steps=int(steps),
        seed=int(seed),
    )


def run_path(s: dict) -> Path:
    return (
        OUT
        / "runs"
        / s["preset"]
        / (f"{s['mode']}_lr{s['lr']:g}_head{s['head_lr']:g}_steps{s['steps']}_seed{s['seed']}.json")
    )


def command(s: dict) -> list[str]:
    return [
        "python",
        "benchmarks/lm_ablations.py",
        "one",
        "--preset",
        s["preset"],
        "--mode",
        s["mode"],
        "--lr",
        f"{s['lr']:g}",
        "--head-lr",
        f"{s['head_lr']:g}",
        "--steps",
        str(s["steps"]),
        "--seed",
        str(s["seed"]),
    ]


_LOADED: dict[Path, dict] = {}  # a run's JSON never changes once written


def load(s: dict) -> dict | None:
    path = run_path(s)
    if path not in _LOADED and path.is_file():
        _LOADED[path] = json.loads(path.read_text())
    return _LOADED.get(path)


def train_one(s: dict) -> None:
    """Train one run in this process (one thread) and write its JSON."""
    import torch

    from dfa_kernels import provenance
    from dfa_kernels.zoo.tasks import TrainConfig, get
    from dfa_kernels.zoo.training import train

    if s["steps"] % STEPS_PER_EPOCH:
        raise SystemExit(f"--steps must be a multiple of {STEPS_PER_EPOCH}")
    torch.set_num_threads(1)
    config = TrainConfig(
        task=TASK,
        mode=s["mode"],
        placement="macro",
        preset=s["preset"],
        epochs=s["steps"] // STEPS_PER_EPOCH,
        seed=s["seed"],
        progress=False,
        feedback="paper",
        hp=dict(lr=s["lr"], head_lr=s["head_lr"]),
        alignment_every=10**9 if s["mode"] == "dfa" else None,
    )  # dfa: once, at the end
    start = time.perf_counter()
    result = train(get(TASK), config)
    origin = provenance.provenance()
    origin["command"] = shlex.join(command(s))
    record = {
        "spec": s,
        "final": result.final,
        "history": result.history,
        "config": result.config,
        "alignment": result.alignment,
        "backend": result.backend,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "provenance": origin,
    }
    path = run_path(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    print(
        f"{path.relative_to(ROOT)}: val {result.final['val_loss']:.4f} test {result.final['test_loss']:.4f} "
        f"({record['wall_time_s']} s)",
        flush=True,
    )


# ---------------------------------------------------------------- the plan
def recipe():
    from dfa_kernels.zoo.recipes import transformer as R

    return R


def tuning_trials(preset: str, mode: str) -> list[dict]:
    R = recipe()
    return [spec(preset, mode, c["lr"], c["head_lr"], BASE_STEPS, 0) for c in R.TIED_GRID]


def winner(preset: str, mode: str, steps: int = BASE_STEPS) -> tuple[float, float] | None:
    """(lr, head_lr) for `preset` and `mode`: the recipe's for "cpu", else the best validation loss
    of the tuning trials (None until they have all run)."""
    R = recipe()
    if preset == "cpu":
        return R.lrs(TASK, "cpu", mode, "macro")
    trials = [(load(t), t) for t in tuning_trials(preset, mode)]
    if any(r is None for r, _ in trials):
        return None
    best = min(
        trials, key=lambda rt: math.inf if math.isnan(rt[0]["final"]["val_loss"]) else rt[0]["final"]["val_loss"]
    )
    return best[1]["lr"], best[1]["head_lr"]


def lower(rate: float) -> float:
    """One step down the 1-3-10 grid: 3e-3 -> 1e-3 -> 3e-4."""
    exponent = math.floor(math.log10(rate) + 1e-9)
    mantissa = round(rate / 10**exponent)
    return float(f"1e{exponent}") if mantissa == 3 else float(f"3e{exponent - 1}")


def probe_rate(preset: str, mode: str) -> tuple[float, float] | None:
    """The winner's rates one grid step lower (every parameter group)."""
    w = winner(preset, mode)
    return None if w is None else (lower(w[0]), lower(w[1]))


def plan() -> list[tuple[str, callable]]:
    """Every run, in the order they are launched: (stage, a function returning its spec, or None
    while a run it depends on is missing). First what the others wait for (the tuning, DFA's
    first), then the 300-step seeds, then the ladder from its top (the 4x budget) down, then the
    probes."""
    jobs = []

    def add(stage, fn):
        jobs.append((stage, fn))

    def tuned_spec(p, m, steps, seed):
        return lambda: None if winner(p, m) is None else spec(p, m, *winner(p, m), steps, seed)

    tuning = [(p, m) for p in TUNED_PRESETS for m in MODES]
    for preset, mode in sorted(tuning, key=lambda pm: (pm[1] != "dfa", pm[0] != "cpu-tied")):
        for t in tuning_trials(preset, mode):
            add(f"tune {preset}", lambda t=t: t)
    for preset in ("cpu", *TUNED_PRESETS):
        for mode in MODES:
            for seed in SEEDS:
                add(f"seeds {preset}", tuned_spec(preset, mode, BASE_STEPS, seed))
    for steps in sorted({st for budgets in LADDER.values() for st in budgets}, reverse=True):
        for preset, budgets in LADDER.items():
            if steps in budgets:
                for seed in SEEDS:
                    for mode in MODES:
                        add(f"ladder {preset}", tuned_spec(preset, mode, steps, seed))
    for preset in LADDER:
        for mode in MODES:
            add(
                f"probe {preset}",
                lambda p=preset, m=mode: (
                    None if probe_rate(p, m) is None else spec(p, m, *probe_rate(p, m), PROBE_STEPS, 0)
                ),
            )
    return jobs


def running_commands() -> set[str]:
    """The `one` commands running now on this machine (any driver's, or by hand), as shlex.join
    of ["python", "benchmarks/lm_ablations.py", ...]."""
    out = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith("lm_ablations.py") and argv[2] == "one":
            out.add(shlex.join(["python", "benchmarks/lm_ablations.py", *argv[2:]]))
    return out


def resolved() -> list[tuple[str, dict | None]]:
    out, seen = [], set()
    for stage, fn in plan():
        s = fn()
        key = None if s is None else json.dumps(s, sort_keys=True)
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append((stage, s))
    return out


def show_plan() -> None:
    done = waiting = todo = 0
    for stage, s in resolved():
        if s is None:
            waiting += 1
            print(f"{stage:<16} (waits for its tuning)")
            continue
        status = "done" if run_path(s).is_file() else "todo"
        done, todo = done + (status == "done"), todo + (status == "todo")
        print(f"{stage:<16} {status}  {shlex.join(command(s))}")
    print(f"{done} done, {todo} to run, {waiting} waiting for tuning")


def run_all(jobs: int, nice: int, stages: list[str] | None) -> None:
    """Launch the missing runs, `jobs` at a time, each as its own `one` command (runs already
    running on this machine, from an earlier driver, count as running)."""
    running: dict[str, subprocess.Popen] = {}
    failed = set()
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while True:
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode:
                    failed.add(key)
                    print(f"FAILED ({proc.returncode}): {key}", flush=True)
        now = resolved()
        elsewhere = running_commands() - set(running)
        pending = [
            s
            for stage, s in now
            if s is not None and not run_path(s).is_file() and (stages is None or stage.split()[0] in stages)
        ]
        pending = [s for s in pending if shlex.join(command(s)) not in set(running) | failed | elsewhere]
        waiting = [1 for stage, s in now if s is None and (stages is None or stage.split()[0] in stages)]
        if not pending and not running and not elsewhere:
            print(
                f"finished; {len(failed)} failed, {len(waiting)} waiting for a tuning that did not finish", flush=True
            )
            return
        while pending and len(running) + len(elsewhere) < jobs:
            s = pending.pop(0)
            key = shlex.join(command(s))
            log = open(logs / f"{s['preset']}_{run_path(s).stem}.log", "w")
            print(f"start: {key}", flush=True)
            running[key] = subprocess.Popen(
                ["nice", "-n", str(nice), sys.executable, *command(s)[1:]],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        time.sleep(20)


# ---------------------------------------------------------------- the report
def stats(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def group(preset: str, steps: int) -> dict | None:
    """BP / DFA / shallow of one preset and budget (seeds 0-2, winners' rates), with the gaps."""
    rows = {}
    for mode in MODES:
        w = winner(preset, mode)
        if w is None:
            return None
        records = [load(spec(preset, mode, *w, steps, seed)) for seed in SEEDS]
        if any(r is None for r in records):
            return None
        rows[mode] = {
            "lr": w[0],
            "head_lr": w[1],
            "test": stats([r["final"]["test_loss"] for r in records]),
            "val": stats([r["final"]["val_loss"] for r in records]),
            "still_improving": sum(r["final"]["still_improving_at_budget"] for r in records),
            "git_sha": sorted({r["provenance"]["git_sha"] for r in records}),
            "commands": [r["provenance"]["command"] for r in records],
        }
        if mode == "dfa" and all(r["alignment"] for r in records):  # at the last step
            rows[mode]["alignment"] = {
                "update_cos_network": stats([r["alignment"][-1]["network"]["update_cos"] for r in records]),
                "signal_cos_deepest": stats([r["alignment"][-1]["deepest"]["signal_cos_mean"] for r in records]),
            }
    per_seed = {m: rows[m]["test"]["values"] for m in MODES}
    gap = lambda a, b: stats([x - y for x, y in zip(per_seed[a], per_seed[b])])  # noqa: E731 - paired by seed
    fraction = stats([(s - d) / (s - b) for b, d, s in zip(per_seed["bp"], per_seed["dfa"], per_seed["shallow"])])
    return {
        "preset": preset,
        "steps": steps,
        "modes": rows,
        "gaps_nats": {
            "shallow_minus_bp": gap("shallow", "bp"),
            "dfa_minus_bp": gap("dfa", "bp"),
            "shallow_minus_dfa": gap("shallow", "dfa"),
        },
        "fraction_of_gap_closed": fraction,
        "pairing": "gaps and fraction per seed (the same seed: the same data order), then mean and std",
    }


def tuning_report(preset: str) -> dict | None:
    """`dfa-kernels tune`'s report format, from this study's tuning runs."""
    from dfa_kernels import provenance

    R = recipe()
    modes = {}
    for mode in MODES:
        trials = [(t, load(t)) for t in tuning_trials(preset, mode)]
        if any(r is None for _, r in trials):
            return None
        rows = [
            {
                "hp": {"lr": t["lr"], "head_lr": t["head_lr"]},
                "val_loss": r["final"]["val_loss"],
                "best_epoch": r["final"]["best_epoch"],
                "stopped": r["final"]["stopped"],
                "git_sha": r["provenance"]["git_sha"],
                "command": r["provenance"]["command"],
            }
            for t, r in trials
        ]
        best = min(rows, key=lambda t: math.inf if math.isnan(t["val_loss"]) else t["val_loss"])["hp"]
        lr, head_lr = R.lrs(TASK, preset, mode, "macro")
        recipe_hp = {"lr": lr, "head_lr": head_lr}
        modes["dfa-macro" if mode == "dfa" else mode] = {
            "selected_by": "val_loss",
            "trials": rows,
            "best": best,
            "recipe": recipe_hp,
            "recipe_matches": recipe_hp == best,
            "edge": best["lr"] in (R.TIED_RATES[0], R.TIED_RATES[-1]),
        }
    origin = provenance.provenance()
    origin["command"] = "python benchmarks/lm_ablations.py report"
    return {
        "task": TASK,
        "preset": preset,
        "data": None,
        "seed": 0,
        "steps": BASE_STEPS,
        "modes": modes,
        "rule": "best validation loss of one run (seed 0) per candidate; the same candidates for every mode "
        "(the recipe's TIED_GRID: one rate for every parameter)",
        "note": "cpu-tied's bp and shallow trials are cpu-preset runs (the presets differ only in DFA's head rate)"
        if preset == "cpu-tied"
        else None,
        "provenance": origin,
    }


def probes() -> list[dict]:
    out = []
    for preset in LADDER:
        for mode in MODES:
            w, p = winner(preset, mode), probe_rate(preset, mode)
            if w is None:
                continue
            a, b = load(spec(preset, mode, *w, PROBE_STEPS, 0)), load(spec(preset, mode, *p, PROBE_STEPS, 0))
            if a is None or b is None:
                continue
            out.append(
                {
                    "preset": preset,
                    "mode": mode,
                    "steps": PROBE_STEPS,
                    "seed": 0,
                    "winner_300": {"lr": w[0], "head_lr": w[1], "val_loss": a["final"]["val_loss"]},
                    "lower": {"lr": p[0], "head_lr": p[1], "val_loss": b["final"]["val_loss"]},
                    "lower_rate_better_on_validation": b["final"]["val_loss"] < a["final"]["val_loss"],
                }
            )
    return out


PAPER = {"bp": 29.8, "dfa": 52.0, "shallow": 428.0}  # WikiText-103 test perplexity (paper 1; DFA macro)


def paper_gaps() -> dict:
    ln = {k: math.log(v) for k, v in PAPER.items()}
    return {
        "perplexity": PAPER,
        "nats_per_token": ln,
        "shallow_minus_bp": ln["shallow"] - ln["bp"],
        "dfa_minus_bp": ln["dfa"] - ln["bp"],
        "shallow_minus_dfa": ln["shallow"] - ln["dfa"],
        "fraction_of_gap_closed": (ln["shallow"] - ln["dfa"]) / (ln["shallow"] - ln["bp"]),
        "unit": "nats per word-level BPE token (WikiText-103): not the same unit as ours (nats per byte)",
    }


def fmt(st: dict | None, digits: int = 3) -> str:
    if st is None:
        return "—"
    return (
        f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}" if st.get("std") is not None else f"{st['mean']:.{digits}f}"
    )


def report() -> None:
    from dfa_kernels import provenance

    groups = []
    for preset in ("cpu", "cpu-tied", "cpu-paper"):
        for steps in sorted({BASE_STEPS, *LADDER.get(preset, ())}):
            g = group(preset, steps)
            if g is not None:
                groups.append(g)
    tunings = {}
    for preset in TUNED_PRESETS:
        t = tuning_report(preset)
        if t is not None:
            tunings[preset] = t
            (OUT / f"tuning-{preset}.json").write_text(json.dumps(t, indent=1) + "\n")
    origin = provenance.provenance()
    origin["command"] = "python benchmarks/lm_ablations.py report"
    summary = {
        "task": TASK,
        "metric": "test loss, nats per byte (model selected on validation loss)",
        "seeds": list(SEEDS),
        "dfa": "macro placement, the paper's feedback (one shared matrix)",
        "labels": LABELS,
        "groups": groups,
        "probes": probes(),
        "paper": paper_gaps(),
        "run_shas": sorted({sha for g in groups for m in g["modes"].values() for sha in m["git_sha"]}),
        "provenance": origin,
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# LM ablations: {TASK}, test loss in nats/byte, mean ± std over seeds {list(SEEDS)}",
        "",
        "Generated by `python benchmarks/lm_ablations.py report` from the runs in `runs/` (each records its "
        "own command and git SHA). DFA: macro placement, the paper's feedback. Gaps are per seed "
        "(same seed, same data order), then mean ± std; fraction = (shallow − DFA) / (shallow − BP).",
        "",
        "| config | steps | lr BP / DFA / shallow | BP | DFA macro | shallow | shallow − BP | DFA − BP | "
        "shallow − DFA | fraction closed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        m = g["modes"]
        rates = " / ".join(
            f"{m[k]['lr']:g}" + (f" (head {m[k]['head_lr']:g})" if m[k]["head_lr"] != m[k]["lr"] else "") for k in MODES
        )
        gp = g["gaps_nats"]
        lines.append(
            f"| {g['preset']} | {g['steps']} | {rates} | {fmt(m['bp']['test'])} | {fmt(m['dfa']['test'])} | "
            f"{fmt(m['shallow']['test'])} | {fmt(gp['shallow_minus_bp'])} | {fmt(gp['dfa_minus_bp'])} | "
            f"{fmt(gp['shallow_minus_dfa'])} | {fmt(g['fraction_of_gap_closed'], 2)} |"
        )
    p = summary["paper"]
    lines += [
        "",
        f"Paper 1 (WikiText-103, word-level BPE, nats per token): shallow − BP {p['shallow_minus_bp']:.2f}, "
        f"DFA − BP {p['dfa_minus_bp']:.2f}, shallow − DFA {p['shallow_minus_dfa']:.2f}, fraction "
        f"{p['fraction_of_gap_closed']:.2f}: another unit and another data set.",
        "",
    ]
    for preset, t in tunings.items():
        lines.append(f"Tuning {preset} (seed 0, {BASE_STEPS} steps, validation loss per candidate rate):")
        for variant, r in t["modes"].items():
            trials = ", ".join(f"{x['hp']['lr']:g}: {x['val_loss']:.3f}" for x in r["trials"])
            lines.append(f"- {variant}: {trials} → {r['best']['lr']:g}" + (" (grid edge)" if r["edge"] else ""))
        lines.append("")
    if summary["probes"]:
        lines.append(f"Rate probes at {PROBE_STEPS} steps (seed 0, validation loss; they chose nothing):")
        for pr in summary["probes"]:
            lines.append(
                f"- {pr['preset']} {pr['mode']}: the 300-step winner {pr['winner_300']['lr']:g} → "
                f"{pr['winner_300']['val_loss']:.3f}; one step lower ({pr['lower']['lr']:g}) → "
                f"{pr['lower']['val_loss']:.3f}"
            )
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    one = sub.add_parser("one", help="train one run and write its JSON")
    one.add_argument("--preset", required=True)
    one.add_argument("--mode", required=True, choices=MODES)
    one.add_argument("--lr", type=float, required=True)
    one.add_argument("--head-lr", type=float, required=True)
    one.add_argument("--steps", type=int, required=True)
    one.add_argument("--seed", type=int, required=True)
    sub.add_parser("plan", help="every run and whether it is done")
    run = sub.add_parser("run", help="launch the missing runs")
    run.add_argument("--jobs", type=int, default=2)
    run.add_argument("--nice", type=int, default=10)
    run.add_argument("--stages", nargs="+", default=None, choices=["tune", "seeds", "ladder", "probe"])
    sub.add_parser("report", help="write the tuning reports and summary.{json,md}")
    args = ap.parse_args()
    if args.what == "one":
        train_one(
            dict(preset=args.preset, mode=args.mode, lr=args.lr, head_lr=args.head_lr, steps=args.steps, seed=args.seed)
        )
    elif args.what == "plan":
        show_plan()
    elif args.what == "run":
        run_all(args.jobs, args.nice, args.stages)
    else:
        report()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    main()
