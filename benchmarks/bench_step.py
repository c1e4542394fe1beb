"""Training-step benchmark, DFA vs BP vs TinyDFA-style (see dfa_kernels/bench/step.py); writes benchmarks/results/."""

import sys
from pathlib import Path

import torch

from dfa_kernels.bench import step

if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(__file__).parent / "results" / f"step_{device}.json"
    step.main(["--device", device, "--out", str(out)] + sys.argv[1:])
