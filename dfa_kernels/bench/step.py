"""Training-step benchmark: an MLP trained by BP, by our DFA, and by a TinyDFA-style DFA, interleaved.

The TinyDFA-style baseline follows TinyDFA's published design: hidden activations are detached
into leaves with requires_grad=True (so autograd still computes every input gradient), a dense
stored B projects the error, and a Python loop calls .backward() once per layer.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import DFA
from .common import environment, time_ms, write_results


class MLP(nn.Module):
    def __init__(self, depth: int, width: int, classes: int, dfa: DFA | None):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)
        self.dfa = dfa

    def forward(self, x):
        for layer in self.hidden:
            x = torch.relu(layer(x))
            if self.dfa is not None:
                x = self.dfa.point(x)
        y = self.head(x)
        return self.dfa(y) if self.dfa is not None else y


class TinyDFAStyle:
    """DFA as TinyDFA runs it: detached leaves that still require grad, one .backward() per layer."""

    def __init__(self, model: MLP, classes: int, width: int, device):
        self.model = model
        self.B = torch.rand(classes, width, device=device) * 2 - 1
        self.norm = math.sqrt(width)

    def loss_and_backward(self, x, target):
        hs, h = [], x
        for layer in self.model.hidden:
            a = torch.relu(layer(h))
            hs.append(a)
            h = a.detach().requires_grad_(True)
        y = self.model.head(h)
        y.retain_grad()
        loss = F.cross_entropy(y, target)
        loss.backward()
        rp = (y.grad @ self.B) / self.norm
        for a in hs:
            a.backward(rp[:, :a.shape[1]])
        return loss


def run(device="cpu", depth=8, width=1024, batch=256, classes=10, repeats=5, steps=3, dtype="float32",
        out: Path | None = None, progress: bool = True) -> dict:
    device = torch.device(device)
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    x = torch.randn(batch, width, device=device, dtype=dt)
    target = torch.randint(0, classes, (batch,), device=device)
    models = {
        "bp": MLP(depth, width, classes, None),
        "dfa": MLP(depth, width, classes, DFA(mode="dfa", seed=0)),
        "dfa_virtual": MLP(depth, width, classes, DFA(mode="dfa", seed=0, storage="virtual")),
        "tinydfa_style": MLP(depth, width, classes, None),
    }
    for m in models.values():
        m.to(device=device, dtype=dt)
    tiny = TinyDFAStyle(models["tinydfa_style"], classes, width, device)
    optims = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}

    def step_fn(name):
        model, opt = models[name], optims[name]

        def step():
            opt.zero_grad(set_to_none=True)
            if name == "tinydfa_style":
                tiny.loss_and_backward(x, target)
            else:
                F.cross_entropy(model(x).float(), target).backward()
            opt.step()
        return step

    times = {k: [] for k in models}
    peak_mem = {}
    order = list(models)
    for r in tqdm(range(repeats), desc="bench_step", disable=not progress):
        for name in (order if r % 2 == 0 else order[::-1]):  # interleaved, alternating order
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(time_ms(step_fn(name), device, warmup=2, repeats=steps, min_time_s=0.2))
            if device.type == "cuda":
                peak_mem[name] = torch.cuda.max_memory_allocated(device)
    ms = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result = {
        "benchmark": "bench_step",
        "environment": environment(device),
        "config": {"depth": depth, "width": width, "batch": batch, "classes": classes, "dtype": dtype,
                   "optimizer": "SGD", "repeats": repeats,
                   "dfa_backend": models["dfa"].dfa.resolved_backend(device)},
        "ms_per_step": ms,
        "ratio_dfa_over_bp": ms["dfa"] / ms["bp"],
        "ratio_dfa_virtual_over_bp": ms["dfa_virtual"] / ms["bp"],
        "speedup_dfa_over_tinydfa_style": ms["tinydfa_style"] / ms["dfa"],
        "peak_memory_bytes": peak_mem or None,
    }
    if out is not None:
        write_results(Path(out), result)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    res = run(a.device, a.depth, a.width, a.batch, a.classes, a.repeats, dtype=a.dtype, out=a.out)
    print_table(res)
    return res


def print_table(res: dict) -> None:
    ms = res["ms_per_step"]
    print(f"{'step':<16}{'ms/step':>10}{'vs BP':>8}")
    for name, t in ms.items():
        print(f"{name:<16}{t:>10.2f}{t / ms['bp']:>8.2f}")
    print(f"DFA / BP = {res['ratio_dfa_over_bp']:.3f}; DFA is {res['speedup_dfa_over_tinydfa_style']:.2f}x "
          f"faster than the TinyDFA-style loop (backend {res['config']['dfa_backend']})")


if __name__ == "__main__":
    main()
