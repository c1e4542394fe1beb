"""Rewrite the benchmark summary block of README.md from benchmarks/results/{step,projection}_*.json,
and redraw benchmarks/plots/{step,projection}_*.png from the same files.

    python benchmarks/summarize.py            # only the text between the bench-summary markers changes
    python benchmarks/summarize.py --no-plots
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dfa_kernels.bench.summary import summarize

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (README.md, benchmarks/)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args()
    n = summarize(a.root, plots=not a.no_plots)
    print(f"{a.root / 'README.md'}: benchmark summary rewritten from {n} result files")
