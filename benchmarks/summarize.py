"""Rewrite README.md's generated blocks: the benchmark summary from
benchmarks/results/{step,projection}_*.json (and redraw benchmarks/plots/{step,projection}_*.png),
and the zoo tables from benchmarks/results/zoo/*.json.

    python benchmarks/summarize.py            # only the text between the markers changes
    python benchmarks/summarize.py --no-plots
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dfa_kernels.bench.summary import summarize
from dfa_kernels.zoo.tables import write_readme

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (README.md, benchmarks/)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args()
    n = summarize(a.root, plots=not a.no_plots)
    print(f"{a.root / 'README.md'}: benchmark summary rewritten from {n} result files")
    write_readme(a.root / "README.md", a.root / "benchmarks" / "results" / "zoo")
    print(f"{a.root / 'README.md'}: zoo tables rewritten from {a.root / 'benchmarks' / 'results' / 'zoo'}")
