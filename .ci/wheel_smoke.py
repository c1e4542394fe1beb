"""The installed package, run from outside the checkout (.ci/run, in a fresh venv holding only
torch and the wheel): it is the venv's copy, its metadata and compiled library are whole, and a
DFA step trains.

    python .ci/wheel_smoke.py [--cpu-only]   # --cpu-only: a wheel built with DFA_KERNELS_FORCE_CPU=1
"""

import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from torch import nn

import dfa_kernels as dk
from dfa_kernels import ops

cpu_only = "--cpu-only" in sys.argv[1:]
where = Path(dk.__file__).resolve()
assert Path(sys.prefix).resolve() in where.parents, f"dfa_kernels imported from {where}, not from the venv"
assert importlib.metadata.version("dfa-kernels") == dk.__version__
info = dk.build_info()
assert info["extension_loaded"], info["extension_error"]
assert info["built_against_torch"] == torch.__version__ == ops.recorded_torch_version(ops._C.__file__)
assert info["cuda_compiled"] == (torch.version.cuda is not None and not cpu_only), info
assert info["warnings"] == [], info["warnings"]
assert info["backend_tables"]["cpu"], "the backend tables did not ship with the wheel"
source = json.loads((where.parent / "_source.json").read_text())
assert len(source.get("git_sha", "")) >= 40, source

# the projection against the matrix it uses, on the compiled CPU kernels
spec = dk.FeedbackSpec(10, [32, 16], seed=3)
e = torch.randn(64, 10)
torch.testing.assert_close(dk.project(e, spec, backend="cpu"), e @ spec.matrix(), rtol=1e-4, atol=1e-4)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out, self.dfa = nn.Linear(20, 32), nn.Linear(32, 16), nn.Linear(16, 10), dk.DFA()

    def forward(self, x):
        x = self.dfa.point(self.l1(x), activation="relu")
        x = self.dfa.linear(x, self.l2, activation="relu")
        return self.dfa(self.out(x))


model = MLP()
x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
nn.functional.cross_entropy(model(x), y).backward()
assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
print(
    f"wheel smoke test passed: dfa_kernels {dk.__version__} from {where.parent}, built against torch "
    f"{info['built_against_torch']}, CUDA kernels {'compiled' if info['cuda_compiled'] else 'not compiled'}, "
    f"commit {source['git_sha'][:12]}"
)
