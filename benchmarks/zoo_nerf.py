"""Train the NeRF of the zoo in every mode; write the PSNR table and a side-by-side test view.

    python benchmarks/zoo_nerf.py                       # cpu preset, the pybullet duck, seed 0
    python benchmarks/zoo_nerf.py --data r2d2           # another pybullet scene
    python benchmarks/zoo_nerf.py --data nerf_synthetic/lego --preset full --device cuda

Writes benchmarks/results/zoo_nerf.json (torch version, date, seed, preset, each mode's test PSNR,
validation curve, time and settings, and the quality bar: PSNR BP > DFA > shallow on the held-out
views), benchmarks/plots/nerf_compare.png (ground truth, BP, DFA, shallow on one test view) and
every rendered test view under runs/zoo_nerf/MODE/ (--views).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from dfa_kernels.zoo.recipes import nerf as R
from dfa_kernels.zoo.tasks import MODES, TrainConfig, get

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(R.PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="a pybullet scene name or a NeRF-synthetic folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: lean)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "zoo_nerf.json")
    ap.add_argument("--plot", type=Path, default=HERE / "plots" / "nerf_compare.png")
    ap.add_argument("--views", type=Path, default=Path("runs") / "zoo_nerf", help="rendered test views (PNG)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task, results, rows = get("nerf"), {}, []
    for mode in MODES:
        start = time.perf_counter()
        res = task.run(TrainConfig(task="nerf", mode=mode, preset=args.preset, seed=args.seed, data=args.data,
                                   device=args.device, out=args.views / mode, progress=False))
        wall = time.perf_counter() - start
        results[mode] = res
        rows.append({"mode": mode, "test_psnr": round(res.final["test_psnr"], 2),
                     "best_val_psnr": round(res.final["best_val_psnr"], 2), "best_epoch": res.final["best_epoch"],
                     "train_seconds": res.final["train_seconds"], "wall_seconds": round(wall, 1),
                     "lr": res.config["lr"], "backend": res.backend, "paper_psnr": task.paper.get(mode),
                     "history": [{k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}
                                 for h in res.history],
                     "config": res.config})
        print(f"nerf {mode:8s} test PSNR {res.final['test_psnr']:.2f} dB  (best val {res.final['best_val_psnr']:.2f}"
              f" at block {res.final['best_epoch']}; {res.final['train_seconds']:.0f} s train, {wall:.0f} s total)",
              flush=True)

    psnr = {m: results[m].final["test_psnr"] for m in MODES}
    bar = {"rule": "test PSNR: BP > DFA > shallow", "bp_minus_dfa": round(psnr["bp"] - psnr["dfa"], 2),
           "dfa_minus_shallow": round(psnr["dfa"] - psnr["shallow"], 2),
           "pass": psnr["bp"] > psnr["dfa"] > psnr["shallow"]}
    out = {"benchmark": "zoo_nerf", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "seed": args.seed, "preset": args.preset, "threads": args.threads,
           "device": args.device, "metric": "test PSNR (dB), mean over the held-out test views, of the "
           "block with the best validation PSNR", "paper": task.paper, "quality_bar": bar, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    R.render_comparison(results, args.plot)

    print("\n| mode | test PSNR | paper (NeRF-synthetic) | train s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['test_psnr']:.2f} | {r['paper_psnr'] or '-'} | {r['train_seconds']:.0f} |")
    print(f"BP - DFA = {bar['bp_minus_dfa']:+.2f} dB, DFA - shallow = {bar['dfa_minus_shallow']:+.2f} dB -> "
          f"{'pass' if bar['pass'] else 'MISS'}")
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
