"""BP / DFA / shallow accuracy of the graph zoo, beside the DFA paper's Table 3.

    python benchmarks/zoo_graph.py                                   # everything, 3 seeds
    python benchmarks/zoo_graph.py --models gcn gat --seeds 0 --datasets planetoid:cora

Datasets: ``planetoid:NAME`` (public split, files from --planetoid-dir, default ../shared/planetoid
or $DFA_PLANETOID_DIR) and ``cora-random`` (graphdatascience's Cora, random split, as the
``*-cora`` tasks train by default). Results are merged into --out (a run adds or replaces its own
cells; runs of other seeds with the same hyper-parameters are kept and pooled), so the grid can
be filled in several sittings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's dfa_kernels, installed or not
DEFAULT_PLANETOID = Path(os.environ.get("DFA_PLANETOID_DIR", ROOT.parent / "shared" / "planetoid"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["gcn", "gat", "cheb", "spline", "dna", "gae"])
    ap.add_argument("--modes", nargs="+", default=["bp", "dfa", "shallow"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["planetoid:cora", "planetoid:citeseer", "cora-random"])
    ap.add_argument("--planetoid-dir", type=Path, default=DEFAULT_PLANETOID)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "graph_planetoid.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import dfa_kernels
    from dfa_kernels.zoo import tasks

    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update({
        "description": "Test metric at the best validation epoch (node models: accuracy; gae: AUC); "
                       "mean and sample std over seeds (seed = weight init, dropout and feedback matrix). "
                       "seconds: wall clock of one run (on a shared, busy machine); cpu_seconds: CPU time.",
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "torch_geometric": __import__("torch_geometric").__version__,
        "dfa_kernels": dfa_kernels.__version__, "preset": args.preset, "device": "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "torch_threads": torch.get_num_threads(),
    })
    results = report.setdefault("results", {})
    for dataset in args.datasets:
        data = None
        if dataset.startswith("planetoid:"):
            data = f"{args.planetoid_dir}:{dataset.split(':', 1)[1]}"
            if not args.planetoid_dir.exists():
                print(f"skip {dataset}: {args.planetoid_dir} not found")
                continue
        for model in args.models:
            task = tasks.get(f"{model}-cora")
            for mode in args.modes:
                runs = []
                for seed in args.seeds:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    cfg = tasks.TrainConfig(task=task.name, mode=mode, seed=seed, preset=args.preset,
                                            data=data, progress=False)
                    r = task.run(cfg)
                    runs.append({"seed": seed, task.metric: r.final[task.metric],
                                 "best_epoch": r.final["best_epoch"],
                                 "seconds": round(time.perf_counter() - start, 1),
                                 "cpu_seconds": round(time.process_time() - cpu_start, 1)})
                    print(f"{dataset:20s} {model:7s} {mode:8s} seed {seed}: {task.metric} "
                          f"{r.final[task.metric]:.4f} ({runs[-1]['seconds']} s)", flush=True)
                cell = results.setdefault(dataset, {}).setdefault(model, {}).get(mode, {})
                if cell.get("hyper_parameters") != {k: v for k, v in r.config.items() if k not in ("seed", "data")}:
                    cell = {}   # other hyper-parameters: earlier seeds are not comparable
                runs = sorted({run["seed"]: run for run in cell.get("runs", []) + runs}.values(),
                              key=lambda run: run["seed"])
                values = [run[task.metric] for run in runs]
                results[dataset][model][mode] = {
                    "metric": task.metric, "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "seeds": [run["seed"] for run in runs], "runs": runs, "paper_cora": task.paper.get(mode),
                    "hyper_parameters": {k: v for k, v in r.config.items() if k not in ("seed", "data")},
                    "backend": r.backend}
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
