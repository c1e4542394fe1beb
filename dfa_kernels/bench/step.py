"""Training-step benchmark: BP vs our DFA (plain points, and the fused forms) vs a TinyDFA-style DFA.

Workloads: an MLP (depth x width), a recommender (DCN on synthetic Criteo-shaped input: 39 fields,
out_features 1), GCN on Cora (the real Cora from graphdatascience when installed, else a synthetic
graph of Cora's size; the result says which) and a causal Transformer LM (micro and macro
placements, and the linear placement that skips every backward GEMM below the head; 12 layers,
d_model 768, bf16 autocast on a GPU, a small config on a CPU). Every
variant of a workload starts from the same weights and is timed interleaved with the others
(alternating order), median of repeats (minimum on a CPU: see common.statistic), each repeat a
CUDA-synchronised batch after warmup. On a GPU the peak memory of each variant is measured alone
(only its model on the device; parameters, gradients, activations and any stored B counted).

- ``bp``: backprop through the same model (DFA mode "bp").
- ``dfa``: ours unfused: a plain point after each activation (``dfa.point(h)``).
- ``dfa_fused``: ours fused: ``dfa.linear(x, layer, act)`` where a linear layer feeds the
  activation (MLP, the LM's FFN), ``dfa.point(a, activation=act)`` on the pre-activation
  elsewhere (DCN's MLP blocks, GCN's first layer): the activation derivative applied in the
  projection's epilogue, the linear layers' weight gradients in one grouped launch. The LM in
  macro placement has no activation at its points, so it has no fused variant.
- ``dfa_shared``: ours with the shared layout (TinyDFA's: one B of the widest point's width,
  every point reads its first columns), a cheaper projection when points are many and wide.
- ``tinydfa_style``: TinyDFA's published design, written here: points detached into leaves that
  still require grad (so autograd computes every input gradient), a dense stored B, and a Python
  loop of ``.backward()`` calls, one per point. It uses the same feedback as ``dfa`` (independent
  layout, 1/sqrt(d_l) scales), so the two compute the same gradients and differ only in mechanics.

``lm_linear`` (``TransformerLM(placement="linear")``) runs every variant with that placement's own
feedback, the shared layout (paper 2's single ``B e``), so its ``dfa_shared`` variant would repeat
``dfa`` and is not run.

Each variant's FLOPs per step are counted too (``count_flops``): DFA skips input gradients but adds
the projection, and the FLOP ratio DFA/BP is the best step-time ratio a compute-bound device can
reach, whatever the kernels. A CPU run also counts the GPU-size LM workloads (on fake tensors).

"DFA (ours)" in the targets is the faster of ``dfa`` and ``dfa_fused`` (same feedback as
``tinydfa_style``; ``dfa_shared`` is reported beside them but changes the feedback matrix).
Targets (met or not): GPU: LM micro DFA step <= 0.75x BP, macro <= 0.95x, linear <= 0.75x, DFA >=
1.5x faster than TinyDFA-style, DFA peak memory <= BP; CPU: the MLP's DFA step <= 0.72x BP and <=
1.02x the ideal hand-written DFA step (``ideal_sketch``: no autograd, no library), the LM linear
placement's <= 0.75x; and the linear placement's counted FLOPs <= 0.75x BP's at the GPU size.

FLOPs are counted with attention in PyTorch's math form (``sdpa_kernel(SDPBackend.MATH)``: QKᵀ and
AV as matmuls over the full T x T, twice that backward): the flop counter has no formula for the
CPU attention kernel, which the fake-tensor counts would otherwise run and not count.
"""

from __future__ import annotations

import argparse
import gc
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .. import DFA, FeedbackSpec, ops
from ..zoo.models.transformer import POINTS_PER_BLOCK
from .common import Deadline, environment, statistic, summarise, time_ms, tqdm, write_results

LR = 1e-4  # SGD, every variant


class TinyDFAStyle(nn.Module):
    """A stand-in for a model's ``dfa``: same calls (``point``, ``__call__``), TinyDFA's mechanics.
    After ``loss.backward()``, ``finish()`` sends e @ B_l to each point with its own ``.backward()``."""

    def __init__(self, seed: int = 0, layout: str = "independent"):
        super().__init__()
        self.seed, self.layout, self.B, self._points, self._y = seed, layout, None, [], None

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
            spec = FeedbackSpec(
                e.shape[1], [p.reshape(e.shape[0], -1).shape[1] for p in points], self.seed, layout=self.layout
            )
            self.B = spec.matrix(torch.float32, e.device)
            self.slices = [(o, w, s) for o, w, s in zip(spec.offsets, spec.widths, spec.scales())]
        F_all = e.float() @ self.B
        for p, (off, w, scale) in zip(points, self.slices):
            p.backward((F_all[:, off : off + w] * scale).reshape(p.shape).to(p.dtype))


# ---------------------------------------------------------------- workloads
def _dfa(variant: str, layout: str = "independent") -> DFA:
    return DFA(mode="bp" if variant == "bp" else "dfa", layout="shared" if variant == "dfa_shared" else layout)


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


class IdealSketchMLP(nn.Module):
    """The least a DFA step of the MLP must do, written by hand in plain torch: no autograd, no
    optimizer object, no library: the forward (keeping each layer's input), the error of the softmax
    cross-entropy, one projection e @ B on a stored B (dk.DFA's feedback: the same matrix and
    per-point scales), each layer's delta (relu') and weight gradient, the SGD update in place. The
    yardstick for the library's own overhead (``ideal_sketch`` variant: DFA (ours) / it)."""

    def __init__(self, depth: int, width: int, classes: int, x, target, lr: float = LR):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, classes)
        self.dfa = None
        spec = FeedbackSpec(classes, [width] * depth)
        self.register_buffer(
            "B",
            torch.cat(
                [spec.matrix()[:, o : o + w] * s for o, w, s in zip(spec.offsets, spec.widths, spec.scales())], 1
            ),
        )
        self.x, self.target, self.lr, self.width = x, target, lr, width

    @torch.no_grad()
    def manual_step(self) -> None:
        hs = [self.x]
        for layer in self.hidden:
            hs.append(torch.relu(torch.addmm(layer.bias, hs[-1], layer.weight.t())))
        y = torch.addmm(self.head.bias, hs[-1], self.head.weight.t()).float()
        e = torch.softmax(y, 1)
        e[torch.arange(e.shape[0], device=e.device), self.target] -= 1.0
        e /= e.shape[0]
        F_all = e @ self.B
        self.head.weight.sub_(e.t() @ hs[-1], alpha=self.lr)
        self.head.bias.sub_(e.sum(0), alpha=self.lr)
        for l, layer in enumerate(self.hidden):
            delta = F_all[:, l * self.width : (l + 1) * self.width] * (hs[l + 1] > 0)
            layer.weight.sub_(delta.t() @ hs[l], alpha=self.lr)
            layer.bias.sub_(delta.sum(0), alpha=self.lr)


def _mlp(device, dtype, size):
    depth, width, batch, classes = {"cpu": (8, 1024, 256, 10), "gpu": (8, 4096, 4096, 10), "tiny": (2, 32, 16, 4)}[size]
    x = torch.randn(batch, width, device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch,), device=device)

    def build(variant):
        if variant == "ideal_sketch":
            return IdealSketchMLP(depth, width, classes, x, target)
        dfa = TinyDFAStyle() if variant == "tinydfa_style" else _dfa(variant)
        return MLP(depth, width, classes, dfa, fused=variant == "dfa_fused")

    def loss(model):
        return F.cross_entropy(model(x).float(), target)

    return build, loss, {"depth": depth, "width": width, "batch": batch, "classes": classes}


def _fused_dcn_forward(self, idx, bag):
    """DCN's forward with its MLP blocks (Linear -> BatchNorm -> ReLU) as fused points on the
    pre-activation (the block's BatchNorm sits between the linear layer and the ReLU, so
    ``dfa.linear`` does not apply); the cross layers have no activation and stay plain points."""

    x0 = self.dfa.point(self.embed(idx, bag)).flatten(1)
    x = x0
    for layer in self.cross[:-1]:
        x = self.dfa.point(layer(x0, x))
    h = x0
    for lin, bn, _, drop in self.mlp[:-1]:
        h = drop(self.dfa.point(bn(lin(h)), activation="relu"))
    stack = self.dfa.point(torch.cat([self.cross[-1](x0, x), self.mlp[-1](h)], 1))
    return self.dfa(self.out(stack))


def _dcn(device, dtype, size):
    from ..zoo.models.recsys import DCN

    batch, fields, vocab, hidden = {
        "cpu": (1024, 39, 100_000, (1024, 1024)),
        "gpu": (8192, 39, 1_000_000, (1024, 1024)),
        "tiny": (16, 5, 50, (16, 16)),
    }[size]
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, fields), generator=g).to(device)
    target = torch.randint(0, 2, (batch,), generator=g).float().to(device)

    def build(variant):
        model = DCN(vocab, fields, hidden=hidden)
        model.dfa = TinyDFAStyle() if variant == "tinydfa_style" else _dfa(variant)
        if variant == "dfa_fused":
            model.forward = _fused_dcn_forward.__get__(model)
        return model

    def loss(model):
        return F.binary_cross_entropy_with_logits(model(idx, None).float().reshape(-1), target)

    return (
        build,
        loss,
        {
            "model": "DCN",
            "batch": batch,
            "fields": fields,
            "vocab": vocab,
            "mlp": list(hidden),
            "cross_layers": 6,
            "embed_dim": 16,
            "data": f"synthetic Criteo-shaped input ({fields} one-valued fields, uniform ids, random labels)",
        },
    )


def _cora_like(size):
    """(x, edge_index, y, train_mask, description): the real Cora (graphdatascience's parquet
    files, row-normalised features, the zoo's random split) when installed, else a synthetic graph
    of Cora's size (2708 nodes, 1433 binary features ~18 per node, 5278 undirected edges, 7
    classes, 140 training nodes); "tiny": a small synthetic graph."""
    if size != "tiny":
        try:
            import torch_geometric.transforms as T

            from ..zoo.data.cora import load_cora

            data = T.NormalizeFeatures()(load_cora(split_seed=0))
            return data.x, data.edge_index, data.y, data.train_mask, "cora (graphdatascience parquet, random split)"
        except Exception as err:  # noqa: BLE001 - not installed, or unreadable: the synthetic graph, saying why
            why = f"{type(err).__name__}: {err}".splitlines()[0]
    else:
        why = "tiny size"
    nodes, feats, words, edges, classes, train = (
        (2708, 1433, 18, 5278, 7, 140) if size != "tiny" else (60, 40, 5, 120, 3, 12)
    )
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(nodes, feats)
    x.scatter_(1, torch.randint(0, feats, (nodes, words), generator=g), 1.0)
    x = x / x.sum(1, keepdim=True)
    src, dst = torch.randint(0, nodes, (2, edges), generator=g)
    keep = src != dst
    edge_index = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], 1)
    y = torch.randint(0, classes, (nodes,), generator=g)
    train_mask = torch.zeros(nodes, dtype=torch.bool)
    train_mask[torch.randperm(nodes, generator=g)[:train]] = True
    what = "a small synthetic graph" if size == "tiny" else "synthetic graph of Cora's size"
    return (
        x,
        edge_index,
        y,
        train_mask,
        (
            f"{what} ({nodes} nodes, {feats} features, {edges} undirected edges, "
            f"{classes} classes; real Cora not used: {why})"
        ),
    )


def _fused_gcn_forward(self, x, edge_index, edge_attr=None):
    """GCN with its hidden point fused on the pre-activation: ``dfa.point(conv1(x), "relu")``. The
    dropout after the ReLU then acts on the point's (detached) output: in DFA mode the feedback no
    longer passes through the dropout mask (the plain GCN's point sits after the dropout)."""
    from ..zoo.models.graph import feature_dropout

    x = feature_dropout(x, self.dropout, self.training)
    h = F.dropout(self.dfa.point(self.conv1(x, edge_index), activation="relu"), self.dropout, self.training)
    return F.log_softmax(self.dfa(self.conv2(h, edge_index)), dim=-1)


def _gcn(device, dtype, size):
    from ..zoo.models.graph import GCN

    x, edge_index, y, train_mask, source = _cora_like(size)
    x, edge_index, y, train_mask = x.to(device), edge_index.to(device), y.to(device), train_mask.to(device)
    classes, hidden = int(y.max()) + 1, 16

    def build(variant):
        dfa = TinyDFAStyle() if variant == "tinydfa_style" else _dfa(variant)
        model = GCN(x.shape[1], classes, hidden=hidden, dropout=0.5, dfa=dfa)
        if variant == "dfa_fused":
            model.forward = _fused_gcn_forward.__get__(model)
        return model

    def loss(model):
        return F.nll_loss(model(x, edge_index)[train_mask], y[train_mask])

    return (
        build,
        loss,
        {
            "model": "GCN (2 layers, PyG GCNConv)",
            "nodes": x.shape[0],
            "features": x.shape[1],
            "edges": edge_index.shape[1],
            "classes": classes,
            "hidden": hidden,
            "full_batch": True,
            "data": source,
        },
    )


def _lm(placement):
    layout = LAYOUT.get(f"lm_{placement}", "independent")

    def workload(device, dtype, size):
        from ..zoo.models.transformer import TransformerLM

        layers, d, heads, T, batch, vocab = {
            "cpu": (4, 256, 4, 128, 8, 256),
            "gpu": (12, 768, 12, 1024, 8, 50257),
            "tiny": (2, 32, 2, 16, 2, 64),
        }[size]
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (batch, T + 1), generator=g).to(device)

        def build(variant):
            model = TransformerLM(
                vocab,
                context=T,
                layers=layers,
                d_model=d,
                heads=heads,
                placement=placement,
                fused=variant == "dfa_fused",
            )
            model.dfa = TinyDFAStyle(layout=layout) if variant == "tinydfa_style" else _dfa(variant, layout)
            return model

        def loss(model):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return F.cross_entropy(model(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten())

        return (
            build,
            loss,
            {
                "model": "TransformerLM (pre-LN, GELU FFN 4x, untied head)",
                "layers": layers,
                "d_model": d,
                "heads": heads,
                "context": T,
                "batch": batch,
                "vocab": vocab,
                "placement": placement,
                "error_at": "hidden",
                "feedback_layout": layout,
                "points": layers * POINTS_PER_BLOCK[placement] + (placement == "linear"),
                "bf16_autocast": device.type == "cuda",
                "data": "random tokens",
            },
        )

    return workload


# workloads whose own feedback is the shared layout (their dfa_shared variant would repeat dfa)
LAYOUT = {"lm_linear": "shared"}
WORKLOADS = {
    "mlp": _mlp,
    "dcn": _dcn,
    "gcn": _gcn,
    "lm_micro": _lm("micro"),
    "lm_macro": _lm("macro"),
    "lm_linear": _lm("linear"),
}
VARIANTS = ("bp", "dfa", "dfa_fused", "dfa_shared", "tinydfa_style", "ideal_sketch")
SKETCHED = {"mlp"}  # workloads with a hand-written ideal DFA step (IdealSketchMLP)
OURS = ("dfa", "dfa_fused")  # same feedback as tinydfa_style; "DFA (ours)" is the faster of the two
# run(compile=True) adds these: the eager variant's model, its step (loss forward + AOTAutograd's
# backward, and the optimizer step) under torch.compile (inductor); compile time is in the warmup
COMPILED = {"bp_compiled": "bp", "dfa_compiled": "dfa", "dfa_fused_compiled": "dfa_fused"}
# Workloads with activations at their points; the others have no fused variant.
FUSABLE = {"mlp", "dcn", "gcn", "lm_micro", "lm_linear"}
# (workload, device type) -> the step-time ratio DFA/BP to reach
RATIO_TARGETS = {
    ("lm_micro", "cuda"): 0.75,
    ("lm_macro", "cuda"): 0.95,
    ("lm_linear", "cuda"): 0.75,
    ("mlp", "cpu"): 0.72,
    ("lm_linear", "cpu"): 0.75,
}
# (workload, device type) -> DFA (ours) / the ideal hand-written step to reach (the library's overhead)
SKETCH_TARGETS = {("mlp", "cpu"): 1.02}
# workload -> the FLOP ratio DFA/BP to reach at the GPU size (counted, so checked on any device)
FLOP_TARGETS = {"lm_linear": 0.75}
TINYDFA_TARGET = 1.5  # GPU: ours at least this much faster than TinyDFA-style
# timing per repeat: time_ms(warmup, repeats, min_time_s); "tiny" sizes (smoke tests): one step each
TIMING = dict(warmup=2, repeats=3, min_time_s=0.2)
TIMING_TINY = dict(warmup=1, repeats=1, min_time_s=0.0)
TIMING_QUICK = dict(warmup=1, repeats=2, min_time_s=0.1)
# the workloads with targets first (a time budget skips the last ones)
ORDER = {
    "cuda": ("lm_micro", "lm_macro", "lm_linear", "mlp", "dcn", "gcn"),
    "cpu": ("mlp", "lm_linear", "dcn", "gcn", "lm_micro", "lm_macro"),
}


def variants_of(name: str) -> list[str]:
    """The variants workload `name` runs."""
    return [
        v
        for v in VARIANTS
        if (v != "dfa_fused" or name in FUSABLE)
        and not (v == "dfa_shared" and LAYOUT.get(name) == "shared")
        and (v != "ideal_sketch" or name in SKETCHED)
    ]


def _step_fn(model, loss_fn, variant):
    """One training step (SGD) of `model` as a closure."""
    if variant == "ideal_sketch":
        return model.manual_step
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    if variant in COMPILED:
        from ..zoo.trainer import compile_loss, compile_optimizer_step

        loss, opt_step = compile_loss(lambda: loss_fn(model)), compile_optimizer_step(opt)

        def compiled_step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt_step()

        return compiled_step

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        if variant == "tinydfa_style":
            model.dfa.finish()
        opt.step()

    return step


def _clear_caches() -> None:
    """Drop the stored B matrices of earlier variants (so each variant's peak counts its own)."""
    ops.clear_matrix_cache()
    gc.collect()
    torch.cuda.empty_cache()


def _peak_memory(build, loss_fn, variant, device) -> int:
    """Peak bytes allocated by one training step of `variant` with only its model on the device
    (parameters, gradients, activations, stored B), after two warmup steps."""
    _clear_caches()
    base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build(variant).to(device)
    step = _step_fn(model, loss_fn, variant)
    step()
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, step
    _clear_caches()
    return peak


def count_flops(name: str, size: str, device, variants) -> dict:
    """FLOPs of one training step of each variant, by ``torch.utils.flop_counter`` (matmuls,
    attention and our ops; elementwise work is not counted). The DFA/BP ratio is the step-time ratio
    a compute-bound device can reach at best. Counted on fake tensors (no compute, so the GPU sizes
    count on a CPU too) when the workload allows, else from one real step on `device`."""

    def count(build, loss_fn, device=None):
        flops = {}
        for v in variants:
            torch.manual_seed(0)
            model = build(v) if device is None else build(v).to(device)
            if isinstance(model.dfa, DFA):
                model.dfa.check_finite = False  # a data-dependent check, which fake tensors cannot run
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                _step_fn(model, loss_fn, v)()
            flops[v] = counter.get_total_flops()
        return flops

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            flops, how = count(*WORKLOADS[name](torch.device("cpu"), torch.float32, size)[:2]), "fake tensors"
    except (DataDependentOutputException, DynamicOutputShapeException):  # e.g. PyG's graph normalisation
        device = torch.device(device)
        flops = count(*WORKLOADS[name](device, torch.float32, size)[:2], device)
        how = f"one real step on {device}"
    return {
        "gflop_per_step": {v: f / 1e9 for v, f in flops.items()},
        "flop_ratio_over_bp": {v: f / flops["bp"] for v, f in flops.items()},
        "counted_on": how,
    }


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def run_workload(
    name: str,
    device,
    size: str,
    repeats: int,
    progress: bool = True,
    deadline: Deadline | None = None,
    timing: dict | None = None,
    compile: bool = False,
) -> dict:
    """Time every variant of workload `name` (with `compile`, the COMPILED ones too). A variant
    other than BP that raises is dropped and reported under "failed_variants" (its traceback
    printed), so one broken path does not cost the others' numbers."""
    device = torch.device(device)
    timing = timing or (TIMING_TINY if size == "tiny" else TIMING)
    deadline = deadline or Deadline(None)
    build_variant, loss_fn, config = WORKLOADS[name](device, torch.float32, size)
    variants = variants_of(name)
    if compile:
        variants += [v for v, base in COMPILED.items() if base in variants]
        torch._dynamo.reset()  # the compiled steps share code objects: each workload gets dynamo's full cache

    def build(variant):  # a compiled variant's model is its eager variant's
        return build_variant(COMPILED.get(variant, variant))

    failed: dict[str, str] = {}

    def attempt(v, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported, and the run goes on
            if v == "bp":
                raise
            traceback.print_exc()
            failed[v] = _error(err)
            variants.remove(v)
            if device.type == "cuda":
                _clear_caches()
            return None

    peak = {}
    if device.type == "cuda":  # alone on the device, before the timed models are built
        for v in list(variants):
            value = attempt(v, _peak_memory, build, loss_fn, v, device)
            if value is not None:
                peak[v] = value
    models = {}
    for v in variants:
        torch.manual_seed(0)  # the same initial weights for every variant
        models[v] = build(v).to(device)
    steps = {v: _step_fn(m, loss_fn, v) for v, m in models.items()}

    times = {v: [] for v in variants}
    for r in tqdm(range(repeats), desc=f"bench_step {name}", disable=not progress, leave=False):
        if r >= 1 and deadline.passed():
            break
        for v in list(variants) if r % 2 == 0 else variants[::-1]:
            t = attempt(v, time_ms, steps[v], device, **timing)
            if t is None:
                times.pop(v, None)
                models.pop(v, None)
                steps.pop(v, None)
            else:
                times[v].append(t)
    ms = {v: summarise(t, device) for v, t in times.items()}
    ours = min((v for v in OURS if v in ms), key=ms.get, default=None)
    backends = {}
    if "dfa" in models:
        backends["project"] = models["dfa"].dfa.resolved_backend(device)
    spec = next((models[v].dfa.spec for v in OURS if v in models), None)
    if "dfa_fused" in models and spec is not None:
        backends["project_points"] = ops.resolve_backend(
            "auto", device, "project_points", ops.resolve_storage("auto", spec), spec.out_features
        )
    result = {
        "config": config,
        "repeats_done": len(times["bp"]),
        "ms_per_step": ms,
        "ms_samples": times,
        "ratio_over_bp": {v: t / ms["bp"] for v, t in ms.items()},
        "ours": None if ours is None else {"variant": ours, "ms": ms[ours], "ratio_over_bp": ms[ours] / ms["bp"]},
        "speedup_over_tinydfa_style": (
            ms["tinydfa_style"] / ms[ours] if ours is not None and "tinydfa_style" in ms else None
        ),
        "ratio_over_ideal_sketch": (
            ms[ours] / ms["ideal_sketch"] if ours is not None and "ideal_sketch" in ms else None
        ),
        "peak_memory_bytes": {v: b for v, b in peak.items() if v in ms} or "not measured (CPU)",
        "dfa_backend": backends.get("project"),
        "dfa_backends": backends,
        "dfa_storage": ops.resolve_storage("auto", spec) if spec is not None else None,
        "feedback_width": spec.total_width if spec is not None else None,
        "failed_variants": failed,
    }
    result["flops"] = count_flops(name, size, device, [v for v in ms if v not in COMPILED])
    if compile:
        result["compiled_over_eager"] = {v: ms[v] / ms[base] for v, base in COMPILED.items() if v in ms and base in ms}
    if peak:
        result["peak_memory_ratio_over_bp"] = {v: b / peak["bp"] for v, b in result["peak_memory_bytes"].items()}
    del models, steps
    if device.type == "cuda":
        _clear_caches()
    return result


def targets(workloads: dict, device_type: str, size: str | None = None) -> list[dict]:
    """The step targets for this device type, met or not, from the measured workloads (none at
    sizes other than the device's own: the targets are about the full-size workloads)."""
    found = []
    if size is not None and size != ("gpu" if device_type == "cuda" else "cpu"):
        return found
    for (name, kind), bar in RATIO_TARGETS.items():
        if kind == device_type and name in workloads and workloads[name]["ours"] is not None:
            o = workloads[name]["ours"]
            flops = workloads[name].get("flops", {}).get("flop_ratio_over_bp", {})
            found.append(
                {
                    "name": f"{name}: DFA step / BP step",
                    "value": o["ratio_over_bp"],
                    "target": f"<= {bar}",
                    "variant": o["variant"],
                    "met": o["ratio_over_bp"] <= bar,
                    "flop_ratio": flops.get(o["variant"]),
                }
            )
    for (name, kind), bar in SKETCH_TARGETS.items():
        w = workloads.get(name)
        if kind == device_type and w and w.get("ratio_over_ideal_sketch") is not None:
            found.append(
                {
                    "name": f"{name}: DFA step / ideal hand-written DFA step",
                    "target": f"<= {bar}",
                    "value": w["ratio_over_ideal_sketch"],
                    "variant": w["ours"]["variant"],
                    "met": w["ratio_over_ideal_sketch"] <= bar,
                }
            )
    if device_type != "cuda":
        return found
    for name, w in workloads.items():
        if w["speedup_over_tinydfa_style"] is None:
            continue
        found.append(
            {
                "name": f"{name}: TinyDFA-style step / DFA step",
                "value": w["speedup_over_tinydfa_style"],
                "target": f">= {TINYDFA_TARGET}",
                "variant": w["ours"]["variant"],
                "met": w["speedup_over_tinydfa_style"] >= TINYDFA_TARGET,
            }
        )
    for name, w in workloads.items():
        mem = w["peak_memory_bytes"]
        if isinstance(mem, dict) and w["ours"] is not None:
            v = w["ours"]["variant"]
            found.append(
                {
                    "name": f"{name}: DFA peak memory / BP peak memory",
                    "value": mem[v] / mem["bp"],
                    "target": "<= 1",
                    "variant": v,
                    "met": mem[v] <= mem["bp"],
                }
            )
    return found


def flop_targets(flops_at_gpu_size: dict, workloads: dict) -> list[dict]:
    """The FLOP targets (DFA (ours) / BP at the GPU size), met or not: ours is the variant the
    timed run picked, else the one with fewer FLOPs."""
    found = []
    for name, bar in FLOP_TARGETS.items():
        if name not in flops_at_gpu_size:
            continue
        ratios = flops_at_gpu_size[name]["flop_ratio_over_bp"]
        ours = (workloads.get(name) or {}).get("ours") or {}
        v = ours.get("variant") or min((v for v in OURS if v in ratios), key=ratios.get)
        found.append(
            {
                "name": f"{name}: DFA FLOPs / BP FLOPs at the GPU size",
                "value": ratios[v],
                "target": f"<= {bar}",
                "variant": v,
                "met": ratios[v] <= bar,
            }
        )
    return found


def run(
    device="cpu",
    workloads=None,
    size=None,
    repeats=5,
    out: Path | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    timing: dict | None = None,
    compile: bool = False,
) -> dict:
    """Measure `workloads` in order (default: the ones with targets on this device first); a
    workload not started before the time budget ran out is listed under "skipped" (one that
    started finishes its current repeat and reports what it has)."""
    device = torch.device(device)
    size = size or ("gpu" if device.type == "cuda" else "cpu")
    workloads = workloads or ORDER[device.type]
    timing = timing or (TIMING_TINY if size == "tiny" else TIMING)
    deadline = Deadline(time_budget_s)
    result = {
        "benchmark": "bench_step",
        "environment": environment(device),
        "size": size,
        "repeats": repeats,
        "timing": timing,
        "statistic": statistic(device),
        "optimizer": "SGD (lr 1e-4)",
        "workloads": {},
        "skipped": {},
        "targets": [],
    }
    for name in tqdm(list(workloads), desc="bench_step", disable=not progress):
        if deadline.passed():
            result["skipped"][name] = "time budget spent"
            continue
        try:
            result["workloads"][name] = run_workload(name, device, size, repeats, progress, deadline, timing, compile)
        except ImportError as err:  # e.g. GCN without torch_geometric
            result["skipped"][name] = _error(err)
        except Exception as err:  # noqa: BLE001 - reported; the other workloads still run
            traceback.print_exc()
            result["skipped"][name] = f"failed: {_error(err)}"
            if device.type == "cuda":
                _clear_caches()
        result["targets"] = targets(result["workloads"], device.type, size)
        if out is not None:  # after each workload, so a long run keeps what it measured
            write_results(Path(out), result)
    if size != "gpu":  # the GPU targets' compute bound, counted without a GPU
        gpu_targets = [n for (n, kind) in RATIO_TARGETS if kind == "cuda" and n in workloads]
        result["flops_at_gpu_size"] = {n: count_flops(n, "gpu", device, variants_of(n)) for n in gpu_targets}
    at_gpu_size = result.get("flops_at_gpu_size") or (
        {n: w["flops"] for n, w in result["workloads"].items()} if size == "gpu" else {}
    )
    if size == ("gpu" if device.type == "cuda" else "cpu"):  # as targets(): about the full-size runs
        result["targets"] += flop_targets(at_gpu_size, result["workloads"])
    if out is not None:
        write_results(Path(out), result)
    return result


def print_table(res: dict) -> None:
    for name, w in res["workloads"].items():
        print(f"{name} ({w['config']}), backends {w['dfa_backends']}, {w['repeats_done']} repeats")
        mem = w["peak_memory_bytes"]
        for v, t in w["ms_per_step"].items():
            m = f"{mem[v] / 2**20:9.0f} MiB peak" if isinstance(mem, dict) else ""
            print(f"  {v:<16}{t:>10.2f} ms{w['ratio_over_bp'][v]:>8.3f}x BP  {m}")
        if "flops" in w:
            print(
                "  FLOPs / BP: "
                + ", ".join(f"{v} {r:.3f}" for v, r in w["flops"]["flop_ratio_over_bp"].items())
                + f" (BP {w['flops']['gflop_per_step']['bp']:.1f} GFLOP, counted on {w['flops']['counted_on']})"
            )
        if w["speedup_over_tinydfa_style"] is not None:
            print(f"  ours ({w['ours']['variant']}) vs TinyDFA-style: {w['speedup_over_tinydfa_style']:.2f}x faster")
        if w.get("compiled_over_eager"):
            print("  compiled / eager step: " + ", ".join(f"{v} {r:.3f}" for v, r in w["compiled_over_eager"].items()))
        for v, why in w.get("failed_variants", {}).items():
            print(f"  {v:<16}failed: {why}")
    for name, why in res["skipped"].items():
        print(f"{name}: skipped ({why})")
    for name, f in res.get("flops_at_gpu_size", {}).items():
        print(
            f"{name} at the GPU size, FLOPs / BP: "
            + ", ".join(f"{v} {r:.3f}" for v, r in f["flop_ratio_over_bp"].items())
        )
    for t in res["targets"]:
        bound = "" if t.get("flop_ratio") is None else f" (FLOP ratio {t['flop_ratio']:.3f})"
        print(
            f"target {t['name']}: {t['value']:.3f} ({t['variant']}){bound}, {t['target']}: "
            f"{'met' if t['met'] else 'NOT met'}"
        )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--workloads",
        nargs="+",
        default=None,
        choices=list(WORKLOADS),
        help="default: all, those with targets on the device first",
    )
    p.add_argument(
        "--size",
        choices=["cpu", "gpu", "tiny"],
        default=None,
        help="problem sizes (default: gpu on CUDA, cpu otherwise; tiny for smoke tests)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later workloads are skipped")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time bp, dfa and dfa_fused with the step under torch.compile (inductor)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    res = run(
        a.device,
        a.workloads,
        a.size,
        a.repeats,
        a.out,
        progress=not a.no_progress,
        time_budget_s=a.time_budget,
        compile=a.compile,
    )
    print_table(res)
    return res


if __name__ == "__main__":
    main()
