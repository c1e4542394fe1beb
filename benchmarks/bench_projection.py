"""Projection microbenchmark (see dfa_kernels/bench/projection.py); writes benchmarks/results/."""

import sys
from pathlib import Path

import torch

from dfa_kernels.bench import projection

if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(__file__).parent / "results" / f"projection_{device}.json"
    projection.main(["--device", device, "--out", str(out)] + sys.argv[1:])
