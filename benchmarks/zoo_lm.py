"""Train the Transformer LM in every mode and placement and write the table of validation losses.

    python benchmarks/zoo_lm.py                       # lm-shakespeare, cpu preset, seed 0 (~15 min)
    python benchmarks/zoo_lm.py --task lm-pydoc       # the small model on Python's docs (~1 min)
    python benchmarks/zoo_lm.py --data wikitext-103/ --preset full --device cuda
    python benchmarks/zoo_lm.py --only dfa-linear     # rerun one row, keep the others from the JSON

Writes benchmarks/results/zoo_lm.json (torch version, date, seed, configs, per-epoch histories, and
the quality bar: validation loss BP < DFA macro < DFA micro < shallow; the linear placement, which
skips every backward GEMM below the head, is reported beside them). Unless --no-ablation, it
also trains DFA macro and micro with the error taken after the head (error_at="logits", vocabulary
wide) instead of at the final hidden state (the default).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from dfa_kernels.zoo.recipes import transformer as R
from dfa_kernels.zoo.tasks import TrainConfig, get

RUNS = [("bp", "macro"), ("dfa", "macro"), ("dfa", "micro"), ("dfa", "linear"), ("shallow", "macro")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="lm-shakespeare", choices=sorted(R.MODEL))
    ap.add_argument("--preset", default="cpu", choices=["cpu", "full"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="WikiText-style text (a file, or a directory of wiki.*.tokens)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: lean)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the error_at='logits' DFA runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo_lm.json")
    ap.add_argument("--only", nargs="+", default=None, metavar="RUN",
                    help="train only these runs (e.g. dfa-linear); the other rows are kept from --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = get(args.task)

    runs = [(mode, placement, {}) for mode, placement in RUNS]
    if not args.no_ablation:
        runs += [("dfa", placement, {"error_at": "logits"}) for placement in ("macro", "micro")]
    kept = json.loads(args.out.read_text())["results"] if args.only and args.out.is_file() else []
    rows = []
    for mode, placement, overrides in runs:
        config = TrainConfig(task=task.name, mode=mode, placement=placement, preset=args.preset,
                             device=args.device, seed=args.seed, data=args.data, progress=False)
        res = R.run_lm(task.name, config, **overrides)
        name = mode if mode != "dfa" else f"dfa-{placement}"
        if overrides:
            name += "".join(f" ({k}={v})" for k, v in overrides.items())
        if args.only and name not in args.only:
            rows += [r for r in kept if r["run"] == name]
            continue
        row = {"run": name, "mode": mode, "placement": placement, "error_at": res.config["error_at"],
               "val_loss": round(res.final["val_loss"], 4), "val_ppl": round(res.final["val_ppl"], 2),
               "test_loss": round(res.final["test_loss"], 4), "test_ppl": round(res.final["test_ppl"], 2),
               "seconds": res.final["train_seconds"], "lr": res.config["lr"], "head_lr": res.config["head_lr"],
               "backend": res.backend, "ablation": bool(overrides),
               "paper_wikitext103_ppl": None if overrides else R.PAPER_MICRO if placement == "micro" else R.PAPER[mode],
               "history": res.history, "config": res.config}
        rows.append(row)
        print(f"{name:34s} val {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f})  test {row['test_loss']:.4f}  "
              f"lr {row['lr']:g}/{row['head_lr']:g}  {row['seconds']:.0f} s", flush=True)

    val = {r["run"]: r["val_loss"] for r in rows if not r["ablation"]}
    order = ["bp", "dfa-macro", "dfa-micro", "shallow"]
    bar = {"rule": "val_loss: bp < dfa-macro < dfa-micro < shallow",
           "pairs": {f"{a} < {b}": {"diff": round(val[b] - val[a], 4), "pass": val[a] < val[b]}
                     for a, b in zip(order, order[1:])}}
    bar["pass"] = all(p["pass"] for p in bar["pairs"].values())
    if "dfa-linear" in val:  # reported, not part of the bar
        bar["dfa-linear"] = {f"vs {k}": round(val["dfa-linear"] - val[k], 4) for k in order if k in val}
    data = R.load_data(task.name, args.data)
    out = {"benchmark": "zoo_lm", "task": task.name, "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "python": platform.python_version(), "seed": args.seed,
           "preset": args.preset, "threads": args.threads, "device": args.device,
           "model": R.MODEL[task.name][args.preset], "train": R.TRAIN[task.name][args.preset],
           "data": data.info, "metric": "loss in nats per byte of the last model (ppl = exp(loss)); "
                                        "paper: WikiText-103 word-level perplexity, not comparable",
           "quality_bar": bar, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")

    print("\n| run | val loss | val ppl | test loss | lr (hidden / head) | paper WikiText-103 ppl |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        paper = r["paper_wikitext103_ppl"]
        print(f"| {r['run']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['test_loss']:.4f} | "
              f"{r['lr']:g} / {r['head_lr']:g} | {paper if paper is not None else '-'} |")
    for pair, p in bar["pairs"].items():
        print(f"{pair}: {p['diff']:+.4f} -> {'pass' if p['pass'] else 'MISS'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
