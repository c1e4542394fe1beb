"""Training-step benchmark: BP vs our DFA (plain points, and the fused forms) vs a TinyDFA-style DFA.

Workloads: an MLP (depth x width), a recommender (DCN, out_features 1) and a causal Transformer LM
(micro and macro placements; bf16 autocast on a GPU). Every variant of a workload starts from the
same weights and is timed interleaved with the others (alternating order), median of repeats.

- ``bp``: backprop through the same model (DFA mode "bp").
- ``dfa``: ours, a plain point after each activation (``dfa.point(h)``): the unfused path.
- ``dfa_fused``: ours, ``dfa.linear(x, layer, act)`` where the model has linear+activation points
  (activation derivative in the projection epilogue, grouped weight gradients).
- ``dfa_shared``: ours with the shared layout (TinyDFA's: one B of the widest point's width,
  every point reads its first columns), a cheaper projection when points are many and wide.
- ``tinydfa_style``: TinyDFA's published design, written here: points detached into leaves that
  still require grad (so autograd computes every input gradient), a dense stored B, and a Python
  loop of ``.backward()`` calls, one per point. It uses the same feedback as ``dfa`` (independent
  layout, 1/sqrt(d_l) scales), so the two compute the same gradients and differ only in mechanics.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import DFA, FeedbackSpec
from .common import environment, time_ms, write_results


class TinyDFAStyle(nn.Module):
    """A stand-in for a model's ``dfa``: same calls (``point``, ``__call__``), TinyDFA's mechanics.
    After ``loss.backward()``, ``finish()`` sends e @ B_l to each point with its own ``.backward()``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed, self.B, self._points, self._y = seed, None, [], None

    def point(self, h, activation=None):
        if activation is not None:
            h = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation](h)
        self._points.append(h)
        return h.detach().requires_grad_(True)

    def forward(self, y):
        y.retain_grad()
        self._y = y
        return y

    def finish(self) -> None:
        points, y, self._points, self._y = self._points, self._y, [], None
        e = y.grad.reshape(-1, y.shape[-1])
        if self.B is None:  # stored once, dense: [out_features, sum of widths]
            spec = FeedbackSpec(e.shape[1], [p.reshape(e.shape[0], -1).shape[1] for p in points], self.seed)
            self.B = spec.matrix(torch.float32, e.device)
            self.slices = [(o, w, s) for o, w, s in zip(spec.offsets, spec.widths, spec.scales())]
        F_all = e.float() @ self.B
        for p, (off, w, scale) in zip(points, self.slices):
            p.backward((F_all[:, off:off + w] * scale).reshape(p.shape).to(p.dtype))


# ---------------------------------------------------------------- workloads
def _dfa(variant: str) -> DFA:
    return DFA(mode="bp" if variant == "bp" else "dfa", layout="shared" if variant == "dfa_shared" else "independent")


class MLP(nn.Module):
    def __init__(self, depth: int, width: int, classes: int, dfa: nn.Module, fused: bool):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)
        self.dfa, self.fused = dfa, fused

    def forward(self, x):
        for layer in self.hidden:
            x = self.dfa.linear(x, layer, "relu") if self.fused else self.dfa.point(torch.relu(layer(x)))
        return self.dfa(self.head(x))


def _mlp(device, dtype, size):
    depth, width, batch, classes = {"cpu": (8, 1024, 256, 10), "gpu": (8, 4096, 4096, 10),
                                    "tiny": (2, 32, 16, 4)}[size]
    x = torch.randn(batch, width, device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch,), device=device)

    def build(variant):
        dfa = TinyDFAStyle() if variant == "tinydfa_style" else _dfa(variant)
        return MLP(depth, width, classes, dfa, fused=variant == "dfa_fused")

    def loss(model):
        return F.cross_entropy(model(x).float(), target)
    return build, loss, {"depth": depth, "width": width, "batch": batch, "classes": classes}


def _dcn(device, dtype, size):
    from ..models.recsys import DCN
    batch, fields, vocab, hidden = {"cpu": (1024, 39, 100_000, (1024, 1024)), "gpu": (8192, 39, 1_000_000, (1024, 1024)),
                                    "tiny": (16, 5, 50, (16, 16))}[size]
    idx = torch.randint(0, vocab, (batch, fields), device=device)
    target = torch.randint(0, 2, (batch,), device=device).float()

    def build(variant):
        model = DCN(vocab, fields, hidden=hidden)
        model.dfa = TinyDFAStyle() if variant == "tinydfa_style" else _dfa(variant)
        return model

    def loss(model):
        return F.binary_cross_entropy_with_logits(model(idx, None).float().reshape(-1), target)
    return build, loss, {"batch": batch, "fields": fields, "vocab": vocab, "mlp": list(hidden), "cross_layers": 6}


def _lm(placement):
    def workload(device, dtype, size):
        from ..models.transformer import TransformerLM
        layers, d, heads, T, batch, vocab = {"cpu": (4, 256, 4, 128, 8, 256), "gpu": (12, 768, 12, 1024, 8, 50257),
                                             "tiny": (2, 32, 2, 16, 2, 64)}[size]
        tokens = torch.randint(0, vocab, (batch, T + 1), device=device)

        def build(variant):
            model = TransformerLM(vocab, context=T, layers=layers, d_model=d, heads=heads, placement=placement,
                                  fused=variant == "dfa_fused")
            model.dfa = TinyDFAStyle() if variant == "tinydfa_style" else _dfa(variant)
            return model

        def loss(model):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())
        return build, loss, {"layers": layers, "d_model": d, "heads": heads, "context": T, "batch": batch,
                             "vocab": vocab, "placement": placement, "bf16_autocast": device.type == "cuda"}
    return workload


WORKLOADS = {"mlp": _mlp, "dcn": _dcn, "lm_micro": _lm("micro"), "lm_macro": _lm("macro")}
VARIANTS = ("bp", "dfa", "dfa_fused", "dfa_shared", "tinydfa_style")
# Workloads without linear+activation points run the fused variant the same as the plain one.
FUSABLE = {"mlp", "lm_micro"}


def run_workload(name: str, device, size: str, repeats: int, progress: bool = True) -> dict:
    device = torch.device(device)
    build, loss_fn, config = WORKLOADS[name](device, torch.float32, size)
    variants = [v for v in VARIANTS if v != "dfa_fused" or name in FUSABLE]
    models = {}
    for v in variants:
        torch.manual_seed(0)  # the same initial weights for every variant
        models[v] = build(v).to(device)
    optims = {v: torch.optim.SGD(m.parameters(), lr=1e-4) for v, m in models.items()}

    def step_fn(v):
        model, opt = models[v], optims[v]

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            if v == "tinydfa_style":
                model.dfa.finish()
            opt.step()
        return step

    times = {v: [] for v in variants}
    peak = {}
    for r in tqdm(range(repeats), desc=f"bench_step {name}", disable=not progress):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[v].append(time_ms(step_fn(v), device, warmup=2, repeats=3, min_time_s=0.2))
            if device.type == "cuda":
                peak[v] = max(peak.get(v, 0), torch.cuda.max_memory_allocated(device))
    ms = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    dfa_best = min(ms[v] for v in ("dfa", "dfa_fused") if v in ms)
    return {
        "config": config, "ms_per_step": ms,
        "ratio_over_bp": {v: t / ms["bp"] for v, t in ms.items()},
        "speedup_over_tinydfa_style": ms["tinydfa_style"] / dfa_best,
        "peak_memory_bytes": peak or "not measured (CPU)",
        "dfa_backend": models["dfa"].dfa.resolved_backend(device),
    }


def run(device="cpu", workloads=tuple(WORKLOADS), size=None, repeats=5, out: Path | None = None,
        progress: bool = True) -> dict:
    device = torch.device(device)
    size = size or ("gpu" if device.type == "cuda" else "cpu")
    result = {"benchmark": "bench_step", "environment": environment(device), "size": size, "repeats": repeats,
              "optimizer": "SGD", "workloads": {}}
    for name in workloads:
        result["workloads"][name] = run_workload(name, device, size, repeats, progress)
        if out is not None:  # after each workload, so a long run keeps what it measured
            write_results(Path(out), result)
    return result


def print_table(res: dict) -> None:
    for name, w in res["workloads"].items():
        print(f"{name} ({w['config']}), backend {w['dfa_backend']}")
        for v, t in w["ms_per_step"].items():
            mem = w["peak_memory_bytes"]
            mem = f"{mem[v] / 2**20:9.0f} MiB" if isinstance(mem, dict) else ""
            print(f"  {v:<16}{t:>10.2f} ms{w['ratio_over_bp'][v]:>8.3f}x BP{mem}")
        print(f"  ours vs TinyDFA-style: {w['speedup_over_tinydfa_style']:.2f}x faster")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--size", choices=["cpu", "gpu", "tiny"], default=None,
                   help="problem sizes (default: gpu on CUDA, cpu otherwise; tiny for smoke tests)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    res = run(a.device, a.workloads, a.size, a.repeats, a.out)
    print_table(res)
    return res


if __name__ == "__main__":
    main()
