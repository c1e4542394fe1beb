"""Rewrite the docs' generated blocks: in docs/benchmarks.md the benchmark summary from
benchmarks/results/{step,projection}_*.json (and redraw benchmarks/plots/{step,projection}_*.png);
in docs/zoo.md the zoo tables from benchmarks/results/zoo/*.json and the list of tuning-grid
departures from the recipes (dfa_kernels.zoo.tuning.departures).

    python benchmarks/summarize.py            # only the text between the markers changes
    python benchmarks/summarize.py --no-plots
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dfa_kernels.bench.summary import PAGE, rewrite_block, summarize
from dfa_kernels.zoo.tables import write_readme as write_zoo_tables
from dfa_kernels.zoo.tuning import departures_markdown

ROOT = Path(__file__).resolve().parents[1]
ZOO_PAGE = Path("docs") / "zoo.md"
DEPARTURES = "<!-- tuning-departures:start -->", "<!-- tuning-departures:end -->"

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (docs/, benchmarks/)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args()
    n = summarize(a.root, plots=not a.no_plots)
    print(f"{a.root / PAGE}: benchmark summary rewritten from {n} result files")
    write_zoo_tables(a.root / ZOO_PAGE, a.root / "benchmarks" / "results" / "zoo")
    print(f"{a.root / ZOO_PAGE}: zoo tables rewritten from {a.root / 'benchmarks' / 'results' / 'zoo'}")
    rewrite_block(a.root / ZOO_PAGE, departures_markdown() + "\n", *DEPARTURES)
    print(f"{a.root / ZOO_PAGE}: tuning departures rewritten from the recipes")
