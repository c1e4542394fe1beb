"""Train every recommender of the zoo in every mode and write the table of test AUC / log loss.

    python benchmarks/zoo_recsys.py                        # cpu preset, MovieLens-100k, seed 0
    python benchmarks/zoo_recsys.py --seeds 0,1,2          # mean and std over seeds
    python benchmarks/zoo_recsys.py --data train.txt --preset full --epochs 2   # a Criteo TSV

Writes benchmarks/results/zoo_recsys.json: torch version, date, seeds, every model x mode x seed,
the mean/std table, and the quality bar (DFA within 0.02 AUC of BP and above shallow, for
DeepFM, DCN and AFN).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch

from dfa_kernels.zoo.recipes import recsys as R
from dfa_kernels.zoo.tasks import TrainConfig, get

BAR_MODELS = ("deepfm", "dcn", "afn")
MODES = ("bp", "dfa", "shallow")


def summarize(rows: list[dict]) -> dict:
    table = {}
    for r in rows:
        table.setdefault(r["model"], {}).setdefault(r["mode"], []).append(r)
    out = {}
    for model, modes in table.items():
        for mode, runs in modes.items():
            cell = {"paper_criteo_auc": runs[0]["paper_criteo_auc"], "seeds": len(runs)}
            for k in ("test_auc", "test_logloss"):
                vals = [r[k] for r in runs]
                cell[k] = round(statistics.mean(vals), 4)
                cell[k + "_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else None
            out.setdefault(model, {})[mode] = cell
    return out


def quality_bar(summary: dict, rows: list[dict]) -> dict:
    bar = {"rule": "DFA test AUC within 0.02 of BP and above shallow (on the mean over seeds)"}
    for m in BAR_MODELS:
        if m in summary and "dfa" in summary[m]:
            s = summary[m]
            gap = round(s["bp"]["test_auc"] - s["dfa"]["test_auc"], 4)
            above = round(s["dfa"]["test_auc"] - s["shallow"]["test_auc"], 4)
            seeds_above = sum(a["test_auc"] > b["test_auc"] for a in rows for b in rows
                              if a["model"] == b["model"] == m and a["seed"] == b["seed"]
                              and (a["mode"], b["mode"]) == ("dfa", "shallow"))
            bar[m] = {"bp_minus_dfa": gap, "dfa_minus_shallow": above,
                      "seeds_dfa_above_shallow": f"{seeds_above}/{s['dfa']['seeds']}",
                      "pass": gap <= 0.02 and above > 0}
    return bar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(R.PRESETS))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    ap.add_argument("--data", default=None, help="a Criteo TSV file (default: MovieLens-100k)")
    ap.add_argument("--models", default=",".join(R.MODELS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: lean)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo_recsys.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]

    rows = []
    for seed in seeds:
        for name in args.models.split(","):
            for mode in (("bp",) if name == "fm" else MODES):     # FM: no hidden layer, BP only
                task = get(f"{name}-ml100k")
                res = task.run(TrainConfig(task=task.name, mode=mode, preset=args.preset, seed=seed,
                                           epochs=args.epochs, data=args.data, progress=False))
                row = {"model": name, "mode": mode, "seed": seed,
                       "test_auc": round(res.final["test_auc"], 4),
                       "test_logloss": round(res.final["test_logloss"], 4),
                       "best_epoch": res.final["best_epoch"], "seconds": res.final["train_seconds"],
                       "lr": res.config["lr"], "backend": res.backend,
                       "paper_criteo_auc": task.paper.get(mode), "history": res.history,
                       "config": res.config}
                rows.append(row)
                print(f"seed {seed} {name:8s} {mode:8s} AUC {row['test_auc']:.4f}  "
                      f"logloss {row['test_logloss']:.4f}  (epoch {row['best_epoch']}, "
                      f"{row['seconds']:.0f} s)", flush=True)

    summary = summarize(rows)
    bar = quality_bar(summary, rows)
    info = R.load_data(args.data).info
    out = {"benchmark": "zoo_recsys", "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "python": platform.python_version(), "seeds": seeds,
           "preset": args.preset, "threads": args.threads, "device": "cpu",
           "data": {k: v for k, v in info.items() if k != "source"},
           "metric": "test AUC / log loss of the best epoch on validation AUC",
           "summary": summary, "quality_bar": bar, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")

    def cell(s):
        if s is None:
            return "- | -"
        pm = lambda k: f" ± {s[k + '_std']:.4f}" if s[k + "_std"] is not None else ""  # noqa: E731
        return f"{s['test_auc']:.4f}{pm('test_auc')} | {s['test_logloss']:.4f}{pm('test_logloss')}"

    print(f"\nseeds {seeds}, preset {args.preset}")
    print("| model | " + " | ".join(f"{m} AUC | {m} logloss" for m in MODES) + " |")
    print("|---" * 7 + "|")
    for name, modes in summary.items():
        print(f"| {name} | " + " | ".join(cell(modes.get(m)) for m in MODES) + " |")
    for m, b in bar.items():
        if m != "rule":
            print(f"{m}: BP - DFA = {b['bp_minus_dfa']:+.4f}, DFA - shallow = {b['dfa_minus_shallow']:+.4f}"
                  f" (DFA above shallow in {b['seeds_dfa_above_shallow']} seeds) -> "
                  f"{'pass' if b['pass'] else 'MISS'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
