"""Scaling laws beyond backpropagation: is DFA ever more compute-efficient than backprop?

Paper 2 (Filipovich et al. 2022, *Scaling Laws Beyond Backpropagation*) trained causal decoder-only
Transformers with backprop and with DFA and concluded (D): BP is more compute-efficient at every
budget. This module reproduces its **method**, on our data and with our numbers
(``dfa-kernels scaling``):

1. **Sweep**: a geometric ladder of model sizes (width and depth grown together, as in Kaplan et
   al. 2020) x methods (``bp``; ``dfa-macro``, ``dfa-micro``, ``dfa-linear``: the zoo's
   :class:`TransformerLM` placements, every DFA method with paper 2's shared feedback matrix, one
   ``B e`` for all layers; ``shallow``: only the final LayerNorm and head learn) x token budgets,
   each budget a run of its own (its own warmup and cosine decay to 10%). The DFA error is taken at
   the final hidden state. A seed fixes the initialisation, the feedback matrix and the order of
   the training windows (the same for every run of that seed); every run is evaluated on the same
   validation and test windows at several points along the run.
2. **Equal tuning**: the parameters form two groups, the body (embeddings and blocks: backprop in
   bp, DFA in the DFA methods, frozen in shallow) and the head (final LayerNorm and head: exact
   gradients in every method). Every method that trains a group tunes its rate on the same grid
   (:func:`tuning_grids`; tests/test_fairness.py checks it), by the same coordinate search at each
   tuning budget, on validation loss, seed 0: the body rate (and warmup) with the head at the
   grid's middle, then the head rate at the chosen body rate (shallow: the head rate only). Each
   tuning budget has its own tuned rates; a longer budget takes those of the longest tuning budget
   below it. Every grid run is recorded.
3. **Compute**: FLOPs per token counted analytically from the model's shapes (forward; BP's
   backward; DFA's real backward: weight gradients, the projection and whatever backprop remains
   inside its segments; head included, the embeddings costing no FLOPs), cross-checked against
   ``torch.utils.flop_counter`` on every method (:func:`flop_check`). Attention is counted as its
   matmuls over the full T x T (QK^T and AV: ``4 T d`` per token and layer forward, twice that
   backward; the causal mask is not exploited). Wall time is recorded beside it.
4. **Fits and verdicts** (:mod:`.scaling_fit`): per method the frontier (chosen on validation,
   reported on test) and ``L(C) = E + A C^-alpha`` with bootstrap CIs over configurations and
   seeds, ``L(N, D)`` where the grid allows, the crossover compute between BP and each DFA
   placement, and the verdict (A)-(D) with its bootstrap confidence. The frontier counts the
   evaluations from ``min_fraction`` of each run on (earlier ones sit inside the warmup, at the
   schedule's peak rate: a dedicated shorter budget measures that compute instead); the verdict's
   sensitivity to that choice (every evaluation; only the second half of each run; without the
   short budgets) is in the result's ``sensitivity``.

Outputs, under ``--out``: ``runs/*.json`` (one per run, written atomically: an interrupted sweep
restarted with the same command skips finished runs; run files of another sweep with the same
setup, e.g. the cpu preset's in the cpu-long one's folder, are reused), ``plan.json`` (the resolved
sweep), ``scaling.json`` (every run, every fit with its CI, the verdicts and their sensitivity, the
git SHA and the command) and two plots: ``scaling.png`` (loss vs compute for every run, fitted
frontiers) and ``scaling_frontiers.png`` (each method's frontier with its bootstrap band).

Presets: ``cpu`` (one core of an idle 2-core CPU for about 20 minutes, 2.9 decades of compute),
``cpu-long`` (the cpu preset's runs plus a larger size, 1,536-step budgets and a second seed at 512
steps: about 70 minutes, 3.6 decades, in stages of about 10 minutes, resumable) and ``gpu`` (an H100/H200: up to 85 M
non-embedding parameters, bf16 autocast, stages of about 8 minutes that ``--stage K`` runs one at a
time, each resumable).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..figures import save_figure
from ..methods import LAYERWISE
from ..provenance import git_sha
from . import scaling_fit as fit

# method -> (DFA mode, placement): the default sweep's (paper 2's) methods
METHODS = {
    "bp": ("bp", "macro"),
    "dfa-macro": ("dfa", "macro"),
    "dfa-micro": ("dfa", "micro"),
    "dfa-linear": ("dfa", "linear"),
    "shallow": ("shallow", "macro"),
}
DFA_METHODS = ("dfa-macro", "dfa-micro", "dfa-linear")
FEEDBACK_LAYOUT = "shared"  # paper 2: one B shared by all layers, one B e for every point
# The parameter groups each method trains (shallow's body is frozen: nothing of it to tune).
GROUPS = {m: ("head",) if m == "shallow" else ("body", "head") for m in METHODS}
PLACEMENTS = ("macro", "micro", "linear")


def method_spec(name: str) -> tuple[str, str]:
    """(mode, placement) of a sweep method: METHODS' names, a direct method of the family at a
    placement ("sdfa-micro", "ternary-linear", "dkp-macro", "fdfa-macro"), or a layer-wise one ("fa", "usf",
    "brsf", "frsf": every linear layer of the model, the head included, converted)."""
    from .. import methods

    if name in METHODS:
        return METHODS[name]
    if name in methods.LAYERWISE:
        return name, "macro"
    mode, _, placement = name.partition("-")
    if mode == "drtp":
        raise ValueError(
            "method 'drtp' projects the one-hot class target, but the sweep takes the error at the "
            "final hidden state (d_model wide), not at the vocabulary's logits: no target to project"
        )
    if mode in methods.DIRECT and placement in PLACEMENTS:
        return mode, placement
    raise ValueError(
        f"unknown method {name!r}: one of {', '.join(METHODS)}, MODE-PLACEMENT with MODE one of "
        f"sdfa, ternary, dkp, fdfa and PLACEMENT one of {', '.join(PLACEMENTS)}, or one of "
        f"{', '.join(methods.LAYERWISE)}"
    )


def groups(method: str) -> tuple[str, ...]:
    """The parameter groups `method` trains (dkp's learned B trains with the body)."""
    return ("head",) if method_spec(method)[0] == "shallow" else ("body", "head")


def compared(methods_: tuple) -> tuple[str, ...]:
    """The methods whose frontier gets a verdict against BP's (all but bp and shallow)."""
    return tuple(m for m in methods_ if m not in ("bp", "shallow"))


@dataclasses.dataclass(frozen=True)
class Preset:
    sizes: tuple  # (layers, d_model, heads) per rung; d_ff = 4 d_model
    context: int
    batch: int
    budgets: tuple  # training steps per run, each its own schedule
    tune_budgets: tuple  # the budgets at which the rates are tuned (each its own)
    lr_grid: dict  # "body", "head": every method training a group tunes it on that grid
    warmup_grid: tuple  # warmup as a fraction of the run (tuned with the body rate)
    eval_fractions: tuple  # evaluation points, as fractions of the run
    min_fraction: float  # the frontier counts evaluations from this fraction of each run on
    eval_tokens: int  # validation (and test) tokens per evaluation (the same windows every time)
    resamples: int  # bootstrap resamples
    seeds: tuple = (0,)  # seeds of the runs at the tuned rates (tuning: the first seed)
    extra_seed_budgets: tuple | None = None  # the budgets run at every seed (None: all of them)
    extrapolate_decades: float = 2.0  # the verdict's horizon beyond the largest measured compute
    threads: int | None = None  # torch CPU threads (None: torch's default)
    stage_seconds: float | None = None  # pack the runs into stages of about this many seconds
    assumed_flop_rate: float = 2e10  # FLOP/s, for the time estimates of --plan and the stages
    step_overhead_s: float = 0.0  # seconds per step beyond the FLOPs (small models on a CPU)
    methods: tuple = tuple(METHODS)  # the sweep's methods (dfa-kernels scaling --methods)


# One grid per group for every method: the body's spans BP's best rates (3e-4 to 1e-2 in a pilot at
# 32 and 128 steps) and DFA's (1e-4 to 1e-3), the head's every method's (shallow's reached 1e-1 at 32 steps).
CPU_GRID = {"body": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "head": (1e-2, 3e-2, 1e-1)}
CPU = dict(
    context=64,
    batch=16,
    lr_grid=CPU_GRID,
    warmup_grid=(0.05,),
    eval_fractions=(0.125, 0.25, 0.5, 0.75, 1.0),
    min_fraction=0.25,
    eval_tokens=8192,
    threads=1,
    assumed_flop_rate=5e10,
    step_overhead_s=0.008,
)  # measured on this 2-core VM, idle
PRESETS = {
    "cpu": Preset(
        sizes=((2, 32, 2), (2, 48, 2), (3, 64, 2), (4, 96, 4)),
        budgets=(32, 128, 512),
        tune_budgets=(32, 128),
        resamples=400,
        **CPU,
    ),
    # the cpu preset's runs and more (a folder of cpu runs can seed it: the same setup)
    "cpu-long": Preset(
        sizes=((2, 32, 2), (2, 48, 2), (3, 64, 2), (4, 96, 4), (4, 128, 4)),
        budgets=(32, 128, 512, 1536),
        tune_budgets=(32, 128),
        seeds=(0, 1),
        extra_seed_budgets=(512,),
        resamples=1000,
        stage_seconds=600,
        **CPU,
    ),
    "gpu": Preset(
        sizes=((2, 128, 2), (3, 192, 3), (4, 256, 4), (6, 384, 6), (8, 512, 8), (12, 768, 12)),
        context=512,
        batch=64,
        budgets=(150, 600, 2400),
        tune_budgets=(150, 600),
        lr_grid={"body": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), "head": (1e-3, 3e-3, 1e-2)},
        warmup_grid=(0.02, 0.1),
        eval_fractions=(0.0625, 0.125, 0.25, 0.5, 0.75, 1.0),
        min_fraction=0.25,
        eval_tokens=262144,
        resamples=2000,
        stage_seconds=480,
        assumed_flop_rate=2e14,
    ),
    # the tests' preset: seconds on a CPU
    "tiny": Preset(
        sizes=((1, 16, 2), (2, 24, 2)),
        context=16,
        batch=4,
        budgets=(4, 6, 12),
        tune_budgets=(4, 6),
        lr_grid={"body": (3e-3, 1e-2), "head": (1e-2, 3e-2)},
        warmup_grid=(0.1,),
        eval_fractions=(0.5, 1.0),
        min_fraction=0.5,
        eval_tokens=512,
        resamples=8,
        seeds=(0, 1),
        extra_seed_budgets=(12,),
        threads=1,
        stage_seconds=12,
        step_overhead_s=0.01,
    ),
}


# ---------------------------------------------------------------- compute
def model_kwargs(size, context: int) -> dict:
    layers, d, heads = size
    return dict(context=context, layers=layers, d_model=d, heads=heads, d_ff=4 * d, dropout=0.0)


def point_widths(size, placement: str) -> list[int]:
    layers, d, _ = size
    f = 4 * d
    return {"macro": [d] * layers, "micro": [d, f, d] * layers, "linear": [d] + [d, 3 * d, d, d, f, d] * layers}[
        placement
    ]


def flops_per_token(size, method: str, vocab: int, context: int, layout: str = FEEDBACK_LAYOUT) -> dict:
    """Training FLOPs per token of one step, from the shapes (matmuls only, as the flop counter):
    forward, backward and their total. Per layer the linear layers cost ``lin = 2 (4 d^2 + 2 d f)``
    forward (qkv, out-projection, fc1, fc2), attention ``4 T d``; the head ``2 d V``. BP's
    backward is twice the forward. DFA's (error at the final hidden state, width d): the head's
    weight and input gradients, then per placement: macro backpropagates inside every block
    (every input gradient but none between blocks); micro skips fc2's input gradient; linear
    computes weight gradients only (no input gradient, no attention backward); plus the projection
    ``2 d D`` with D the widest point (shared layout, computed once) or the sum of the widths.
    fdfa's forward also pushes the points' perturbations to the output from the first point on, in
    PyTorch's forward mode: a linear layer's tangent costs twice its forward (its formula multiplies
    the weight's zero tangent too: measured, a dual linear takes 3.2x a plain one), attention's
    twice its forward; and it estimates B (``2 d sum(widths)``); dkp's backward adds B's gradient
    (the same count)."""
    layers, d, _ = size
    f = 4 * d
    lin, attn, head = 2 * (4 * d * d + 2 * d * f), 4 * context * d, 2 * d * vocab
    forward = layers * (lin + attn) + head
    mode, placement = method_spec(method)
    if mode == "bp" or mode in LAYERWISE:  # layer-wise: the same GEMMs, B in place of W
        backward = 2 * layers * (lin + attn) + 2 * head
    elif mode == "shallow":
        backward = 2 * head  # the head's weight and input gradient (final LN's gains)
    else:
        widths = point_widths(size, placement)
        projection = 2 * d * (max(widths) if layout == "shared" else sum(widths))
        blocks = {
            "macro": 2 * layers * (lin + attn),
            "micro": layers * (2 * lin - 2 * d * f + 2 * attn),
            "linear": layers * lin,
        }[placement]
        learned = 2 * d * sum(widths) if mode == "dkp" else 0  # dkp: B's gradient, e^T h_l at every point
        backward = blocks + 2 * head + projection + learned
        if mode == "fdfa":  # the tangents after the first point (after block 0's attention in micro) and d^T u_l
            after_first = {"macro": layers - 1, "micro": layers - 1, "linear": layers}[placement]
            ffn0 = 2 * (2 * d * f) if placement == "micro" else 0
            forward += after_first * (2 * lin + 2 * attn) + 2 * ffn0 + 2 * d * sum(widths)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def build_model(size, method: str, vocab: int, context: int, seed: int = 0):
    from ..zoo.models.transformer import TransformerLM

    mode, placement = method_spec(method)
    torch.manual_seed(seed)
    if mode in LAYERWISE:  # plain linear layers (no fused dfa.linear points), each converted
        from ..convert import convert_layers

        model = TransformerLM(
            vocab,
            mode=mode,
            placement=placement,
            seed=seed,
            layout=FEEDBACK_LAYOUT,
            fused=False,
            **model_kwargs(size, context),
        )
        convert_layers(model, model.dfa)
        return model
    return TransformerLM(
        vocab, mode=mode, placement=placement, seed=seed, layout=FEEDBACK_LAYOUT, **model_kwargs(size, context)
    )


def counted_flops_per_token(model, vocab: int, batch: int = 2) -> float:
    """FLOPs of one forward + backward of `model` per token, by ``torch.utils.flop_counter``
    (attention in PyTorch's math form, so that it is counted on a CPU too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    T = model.context
    tokens = torch.randint(0, vocab, (batch, T + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    return counter.get_total_flops() / (batch * T)


def flop_check(size, vocab: int, context: int, methods_: tuple = tuple(METHODS)) -> dict:
    """Analytic vs counted FLOPs per token of every method at one size."""
    rows = {}
    for method in methods_:
        analytic = flops_per_token(size, method, vocab, context)["total"]
        counted = counted_flops_per_token(build_model(size, method, vocab, context), vocab)
        rows[method] = {"analytic": analytic, "counted": counted, "relative_difference": analytic / counted - 1}
    return {"size": list(size), "vocab": vocab, "context": context, "methods": rows}


def non_embedding_parameters(model) -> int:
    """Kaplan's N: the blocks' and final LayerNorm's parameters (embeddings and head excluded)."""
    return sum(p.numel() for m in (model.blocks, model.ln_f) for p in m.parameters())


# ---------------------------------------------------------------- data
def corpus(data: str | None = None, tokenizer: str = "byte", bpe_vocab: int = 4096):
    """The sweep's text: --data PATH (WikiText-style, see the zoo's load_wikitext), else Shakespeare
    and the Wikipedia articles of gensim's test data."""
    from ..zoo.data import text

    kwargs = {"bpe_vocab": bpe_vocab} if tokenizer == "bpe" else {}
    if data:
        return text.load_wikitext(data, tokenizer, **kwargs)
    return text.load_english(tokenizer, **kwargs)


# ---------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class Job:
    size: int  # index into the preset's sizes
    method: str
    steps: int
    stage: str  # "body", "head" (a tuning grid's run with that group's rate `lr`) or "run"
    lr: float | None = None
    warmup: float | None = None
    seed: int = 0


def tuning_grids(preset: Preset, method: str) -> dict:
    """The grid each parameter group of `method` is tuned on (and the warmup's, tuned with the
    body, or with the head where the body does not learn)."""
    return {**{g: preset.lr_grid[g] for g in groups(method)}, "warmup": preset.warmup_grid}


def head_start(preset: Preset) -> float:
    """The head's rate while the body rate is searched: the middle of its grid."""
    grid = preset.lr_grid["head"]
    return grid[len(grid) // 2]


def tuning_budget(preset: Preset, steps: int) -> int:
    """The tuning budget whose rates a run of `steps` takes: the longest one up to `steps`."""
    return max(b for b in preset.tune_budgets if b <= steps)


def seeds_of(preset: Preset, steps: int) -> tuple:
    if preset.extra_seed_budgets is None or steps in preset.extra_seed_budgets:
        return preset.seeds
    return preset.seeds[:1]


def jobs(preset: Preset) -> list[Job]:
    """Every run of the sweep, in the order they run: per size (smallest first) and tuning budget
    (shortest first) the body-rate grids, the head-rate grids, then the runs at the tuned rates
    (the tuning budget's other seeds, and the longer budgets that take its rates)."""
    out, first = [], preset.seeds[0]
    for i in range(len(preset.sizes)):
        for t in preset.tune_budgets:
            for method in preset.methods:
                grids = tuning_grids(preset, method)
                stage = "body" if "body" in grids else "head"
                out += [Job(i, method, t, stage, lr, wu, first) for lr in grids[stage] for wu in grids["warmup"]]
            # the head grid's middle was run in the body stage; the tuning budget's first seed is its tuning run
            out += [
                Job(i, method, t, "head", lr, None, first)
                for method in preset.methods
                if "body" in groups(method)
                for lr in preset.lr_grid["head"]
                if lr != head_start(preset)
            ]
            out += [
                Job(i, method, steps, "run", seed=seed)
                for steps in preset.budgets
                if tuning_budget(preset, steps) == t
                for seed in seeds_of(preset, steps)
                if (steps, seed) != (t, first)
                for method in preset.methods
            ]
    return out


def estimated_seconds(job: Job, preset: Preset, vocab: int) -> float:
    size = preset.sizes[job.size]
    tokens = job.steps * preset.batch * preset.context
    train = flops_per_token(size, job.method, vocab, preset.context)["total"] * tokens
    evals = (
        2
        * len(preset.eval_fractions)
        * preset.eval_tokens
        * flops_per_token(size, "bp", vocab, preset.context)["forward"]
    )  # validation and test
    return (train + evals) / preset.assumed_flop_rate + job.steps * preset.step_overhead_s + 0.3


def stages(preset: Preset, vocab: int) -> list[list[Job]]:
    """The jobs packed in order into stages of about preset.stage_seconds (one stage: all)."""
    if preset.stage_seconds is None:
        return [jobs(preset)]
    out, current, spent = [], [], 0.0
    for job in jobs(preset):
        cost = estimated_seconds(job, preset, vocab)
        if current and spent + cost > preset.stage_seconds:
            out.append(current)
            current, spent = [], 0.0
        current.append(job)
        spent += cost
    return out + [current] if current else out


def plan_dict(preset_name: str, preset: Preset, data: str | None, tokenizer: str, bpe_vocab: int, device: str) -> dict:
    """What defines a sweep (a restarted sweep must match it), in its JSON form."""
    return json.loads(
        json.dumps(
            {
                "preset": preset_name,
                **{k: v for k, v in dataclasses.asdict(preset).items() if k != "methods"},
                "data": None if data is None else str(Path(data).resolve()),
                "tokenizer": tokenizer,
                "bpe_vocab": bpe_vocab if tokenizer == "bpe" else None,
                "device": device,
                "methods": {m: dict(zip(("mode", "placement"), method_spec(m))) for m in preset.methods},
                "groups": {m: groups(m) for m in preset.methods},
                "feedback_layout": FEEDBACK_LAYOUT,
                "error_at": "hidden",
            }
        )
    )


# What a run's numbers depend on besides its own size, method, budget, rates and seed: runs
# recorded under the same setup are interchangeable between sweeps.
SETUP_KEYS = (
    "context",
    "batch",
    "eval_fractions",
    "eval_tokens",
    "data",
    "tokenizer",
    "bpe_vocab",
    "device",
    "methods",
    "feedback_layout",
    "error_at",
)


def setup_of(plan: dict) -> dict:
    return {k: plan[k] for k in SETUP_KEYS}


# ---------------------------------------------------------------- one run
def run_id(preset: Preset, job: Job, lr: float, head_lr: float, warmup: float) -> str:
    layers, d, _ = preset.sizes[job.size]
    return f"L{layers}-d{d}_{job.method}_s{job.steps}_lr{lr:g}_hlr{head_lr:g}_wu{warmup:g}_seed{job.seed}"


def _schedule(steps: int, warmup: float):
    warm = max(1, round(warmup * steps))
    return lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def train_run(
    preset: Preset, job: Job, data, lr: float, head_lr: float, warmup: float, device, progress: bool = True
) -> dict:
    """Train one model; returns its record with the validation and test losses at every
    evaluation point."""
    from tqdm.auto import tqdm

    from ..zoo.recipes.transformer import evaluate, windows
    from ..zoo.trainer import Sampled

    size = preset.sizes[job.size]
    device = torch.device(device)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model = build_model(size, job.method, data.vocab_size, preset.context, job.seed).to(device).train()
    head = [p for m in (model.ln_f, model.head) for p in m.parameters()]
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    opt = torch.optim.Adam([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(job.steps, warmup))
    stream = Sampled(lambda g: windows(data.splits["train"], preset.context, preset.batch, g), job.seed)
    evals_at = sorted({max(1, round(f * job.steps)) for f in preset.eval_fractions})
    per_token = flops_per_token(size, job.method, data.vocab_size, preset.context)
    tokens_per_step = preset.batch * preset.context
    evals, wall, train_sum, train_n, status = [], 0.0, 0.0, 0, "ok"
    bar = tqdm(total=job.steps, disable=not progress, leave=False, desc=f"{job.method} L{size[0]}-d{size[1]}")
    for step in range(1, job.steps + 1):
        start = time.perf_counter()
        x, y = next(stream)
        try:  # DFA's check: an error that held NaN/Inf is reported by the next forward
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model.loss(x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except FloatingPointError:
            status = f"diverged at step {step}"
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - start
        value = loss.item()
        if not math.isfinite(value):
            status = f"diverged at step {step}"
            break
        train_sum, train_n = train_sum + value, train_n + 1
        bar.update()
        bar.set_postfix(loss=f"{value:.3f}")
        if step in evals_at:
            val, test = (
                evaluate(model, data.splits[k], preset.eval_tokens, batch_size=64, autocast=autocast)
                for k in ("val", "test")
            )
            evals.append(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "flops": step * tokens_per_step * per_token["total"],
                    "wall_s": wall,
                    "train_loss": train_sum / train_n,
                    "val_loss": val,
                    "test_loss": test,
                }
            )
            train_sum, train_n = 0.0, 0
    bar.close()
    layers, d, heads = size
    return {
        "id": run_id(preset, job, lr, head_lr, warmup),
        "size": job.size,
        "layers": layers,
        "d_model": d,
        "heads": heads,
        "method": job.method,
        "mode": method_spec(job.method)[0],
        "placement": method_spec(job.method)[1],
        "steps": job.steps,
        "tokens": job.steps * tokens_per_step,
        "seed": job.seed,
        "lr": lr,
        "head_lr": head_lr,
        "warmup": warmup,
        "status": status,
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": non_embedding_parameters(model),
        "flops_per_token": per_token,
        "epochs": job.steps * tokens_per_step / len(data.splits["train"]),
        "final_val_loss": evals[-1]["val_loss"] if status == "ok" and evals else None,
        "wall_s": wall,
        "evals": evals,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "bf16_autocast": autocast,
    }


# ---------------------------------------------------------------- the sweep
class PlanMismatch(RuntimeError):
    pass


def _write_json(path: Path, payload) -> None:
    """Atomic: a reader (or a restarted sweep) sees the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def load_runs(out: Path, setup: dict) -> dict[str, dict]:
    """The finished runs under `out`; a run file recorded under another setup is refused."""
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        run = json.loads(p.read_text())
        if run.get("setup") != setup:
            raise PlanMismatch(
                f"{p} was run under another setup (context, batch, evaluations, data, device ...): "
                f"remove it, or use another --out"
            )
        runs[p.stem] = run
    return runs


def _get(preset: Preset, runs: dict, size: int, method: str, steps: int, seed: int, lr, head_lr, warmup):
    return runs.get(run_id(preset, Job(size, method, steps, "run", seed=seed), lr, head_lr, warmup))


def _best(grid: list[dict]) -> dict:
    return min(grid, key=lambda r: math.inf if r["final_val_loss"] is None else r["final_val_loss"])


def body_tuned(preset: Preset, runs: dict, size: int, method: str, budget: int) -> dict | None:
    """The best run of the body-rate grid (at the head's starting rate), None while unfinished."""
    grid = [
        _get(preset, runs, size, method, budget, preset.seeds[0], lr, head_start(preset), wu)
        for lr in preset.lr_grid["body"]
        for wu in preset.warmup_grid
    ]
    return None if None in grid else _best(grid)


def tuning_runs(preset: Preset, runs: dict, size: int, method: str, budget: int) -> list[dict] | None:
    """Every run of the coordinate search of (size, method) at a tuning budget, None while unfinished."""
    seed, grids = preset.seeds[0], tuning_grids(preset, method)
    if "body" not in grids:
        grid = [
            _get(preset, runs, size, method, budget, seed, h, h, wu) for h in grids["head"] for wu in grids["warmup"]
        ]
        return None if None in grid else grid
    body = body_tuned(preset, runs, size, method, budget)
    if body is None:
        return None
    first = [
        _get(preset, runs, size, method, budget, seed, lr, head_start(preset), wu)
        for lr in grids["body"]
        for wu in grids["warmup"]
    ]
    second = [
        _get(preset, runs, size, method, budget, seed, body["lr"], h, body["warmup"])
        for h in grids["head"]
        if h != head_start(preset)
    ]
    return None if None in second else first + second


def tuned(preset: Preset, runs: dict, size: int, method: str, budget: int) -> dict | None:
    """The best run of the tuning grids of (size, method) at a tuning budget (validation loss)."""
    grid = tuning_runs(preset, runs, size, method, budget)
    return None if grid is None else _best(grid)


def resolve(preset: Preset, job: Job, runs: dict) -> tuple[float, float, float] | None:
    """(lr, head_lr, warmup) of a job, or None when it waits for a tuning result. Shallow's body
    does not learn: its body rate is set to the head's (no effect)."""
    if job.stage == "body":
        return job.lr, head_start(preset), job.warmup
    if job.stage == "head":
        if "body" not in groups(job.method):
            return job.lr, job.lr, job.warmup
        body = body_tuned(preset, runs, job.size, job.method, job.steps)
        return None if body is None else (body["lr"], job.lr, body["warmup"])
    best = tuned(preset, runs, job.size, job.method, tuning_budget(preset, job.steps))
    return None if best is None else (best["lr"], best["head_lr"], best["warmup"])


def with_methods(preset: Preset, methods: list[str] | None) -> Preset:
    """`preset` sweeping `methods` (checked; bp first, added when missing), or its own methods."""
    if not methods:
        return preset
    for name in methods:
        method_spec(name)
    return dataclasses.replace(preset, methods=tuple(dict.fromkeys(["bp", *methods])))


def sweep(
    preset_name: str = "cpu",
    out: Path | str = "runs/scaling",
    data: str | None = None,
    tokenizer: str = "byte",
    bpe_vocab: int = 4096,
    device: str | None = None,
    stage: str = "all",
    resume: bool = False,
    time_budget_s: float | None = None,
    progress: bool = True,
    command: list[str] | None = None,
    methods: list[str] | None = None,
) -> dict | None:
    """Run (or continue) a sweep under `out` and analyse it when every run is there.

    methods: the sweep's methods (:func:`method_spec`; default: METHODS, paper 2's), bp included
    always (every verdict is against BP).
    stage: "all" (every run, then the analysis), "fit" (the analysis only, from the finished
    runs), or a stage number (1-based; ``plan`` lists them) to run that stage's runs only.
    resume: continue the sweep recorded in ``out/plan.json`` (its preset, data and options).
    time_budget_s: start no new run after this many seconds (the sweep stays resumable)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if resume:
        if not (out / "plan.json").is_file():
            raise FileNotFoundError(f"--resume: {out}/plan.json not found (no sweep to continue there)")
        recorded = json.loads((out / "plan.json").read_text())
        preset_name, data, tokenizer = recorded["preset"], recorded["data"], recorded["tokenizer"]
        bpe_vocab, device = recorded["bpe_vocab"] or bpe_vocab, device or recorded["device"]
        methods = list(recorded["methods"])
    preset = with_methods(PRESETS[preset_name], methods)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = plan_dict(preset_name, preset, data, tokenizer, bpe_vocab, device)
    if (out / "plan.json").is_file():
        recorded = json.loads((out / "plan.json").read_text())
        diff = sorted(
            k for k in set(plan) | set(recorded) if k not in ("command", "started") and plan.get(k) != recorded.get(k)
        )
        if diff:
            raise PlanMismatch(
                f"{out} holds a different sweep (differs in: {', '.join(diff)}); use another "
                f"--out, or --resume to continue the recorded one"
            )
    else:
        _write_json(out / "plan.json", {**plan, "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    if preset.threads:
        torch.set_num_threads(preset.threads)
    dataset = corpus(data, tokenizer, bpe_vocab)
    all_stages = stages(preset, dataset.vocab_size)
    if stage == "all":
        todo = [j for s in all_stages for j in s]
    elif stage == "fit":
        todo = []
    elif str(stage).isdigit() and 1 <= int(stage) <= len(all_stages):
        todo = all_stages[int(stage) - 1]
    else:
        raise ValueError(f"--stage must be 'all', 'fit' or a stage number 1..{len(all_stages)}; got {stage!r}")
    if not (out / "flop_check.json").is_file():
        _write_json(
            out / "flop_check.json",
            [flop_check(size, dataset.vocab_size, preset.context, preset.methods) for size in preset.sizes],
        )
    started, load_start = time.perf_counter(), os.getloadavg()
    setup = setup_of(plan)
    runs = load_runs(out, setup)
    runs_before = set(runs)
    cost = {j: estimated_seconds(j, preset, dataset.vocab_size) for j in todo}
    bar = tqdm(
        total=sum(cost.values()),
        disable=not progress,
        unit="est-s",
        desc="scaling sweep",
        bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]",
    )
    done = waiting = 0
    for job in todo:
        bar.set_postfix_str(f"runs {done}/{len(todo)}")
        values = resolve(preset, job, runs)
        if values is None:
            waiting += 1
            bar.update(cost[job])
            continue
        rid = run_id(preset, job, *values)
        if rid not in runs:
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                break
            runs[rid] = {
                **train_run(preset, job, dataset, *values, device=device, progress=progress),
                "preset": preset_name,
                "setup": setup,
                "git_sha": git_sha(),
            }
            _write_json(out / "runs" / f"{rid}.json", runs[rid])
        done += 1
        bar.update(cost[job])
    bar.close()
    invocations = _log_invocation(out, stage, started, load_start, trained=len(set(runs) - runs_before))
    finished = all(
        resolve(preset, j, runs) is not None and run_id(preset, j, *resolve(preset, j, runs)) in runs
        for s in all_stages
        for j in s
    )
    if waiting:
        print(
            f"{waiting} run(s) of this stage wait for tuning runs of an earlier stage; run that stage first",
            file=sys.stderr,
        )
    if not finished and stage != "fit":
        missing = sum(
            1
            for s in all_stages
            for j in s
            if resolve(preset, j, runs) is None or run_id(preset, j, *resolve(preset, j, runs)) not in runs
        )
        print(f"{missing} run(s) of the sweep still to do: rerun the same command to continue", file=sys.stderr)
        return None
    result = analyse(preset, runs, json.loads((out / "flop_check.json").read_text()), dataset.vocab_size)
    result.update(
        plan=plan,
        command=command,
        git_sha=git_sha(),
        data=dataset.info,
        environment=_environment(device),
        finished=finished,
        timing={
            "training_wall_s_all_runs": sum(r["wall_s"] for r in runs.values()),
            "runs_by": dict(Counter(f"{r['preset']} at {r.get('git_sha')}" for r in runs.values())),
            "invocations": invocations,
            "cpu_count": os.cpu_count(),
        },
    )
    _write_json(out / "scaling.json", result)
    plot(result, out)
    return result


def _log_invocation(out: Path, stage: str, started: float, load_start, trained: int) -> list[dict]:
    """Append this invocation (stage, seconds, runs trained, load averages) to out/invocations.json:
    a sweep's time is the sum over the invocations that trained its runs."""
    path = out / "invocations.json"
    log = json.loads(path.read_text()) if path.is_file() else []
    log.append(
        {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "stage": stage,
            "runs_trained": trained,
            "seconds_before_analysis": time.perf_counter() - started,
            "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
        }
    )
    _write_json(path, log)
    return log


def _environment(device: str) -> dict:
    from ..bench.common import environment

    return environment(torch.device(device))


# ---------------------------------------------------------------- analysis
def selected(preset: Preset, runs: dict) -> dict[str, list[list[dict]]]:
    """Per method, the configurations the fits use: per size and budget, the runs (one per seed)
    at the rates tuned for that budget (diverged runs left out)."""
    chosen = {m: [] for m in preset.methods}
    for size in range(len(preset.sizes)):
        for method in preset.methods:
            for steps in preset.budgets:
                best = tuned(preset, runs, size, method, tuning_budget(preset, steps))
                if best is None:
                    continue
                rs = [
                    _get(preset, runs, size, method, steps, seed, best["lr"], best["head_lr"], best["warmup"])
                    for seed in seeds_of(preset, steps)
                ]
                rs = [r for r in rs if r is not None and r["status"] == "ok"]
                if rs:
                    chosen[method].append(rs)
    return chosen


def variants(preset: Preset) -> dict[str, dict]:
    """The frontier's readings whose verdicts are compared (`sensitivity`): which evaluations and
    budgets count. "primary" is the one the fits, bands and verdicts report."""
    out = {
        "primary": dict(
            min_fraction=preset.min_fraction,
            min_budget=min(preset.budgets),
            meaning=f"evaluations from {preset.min_fraction:g} of each run on, every budget",
        ),
        "all_evaluations": dict(
            min_fraction=0.0,
            min_budget=min(preset.budgets),
            meaning="every evaluation, inside the warmup included, every budget",
        ),
        "late_evaluations": dict(
            min_fraction=0.5,
            min_budget=min(preset.budgets),
            meaning="evaluations in the second half of each run only, every budget",
        ),
    }
    if len(preset.tune_budgets) > 1:
        out["no_short_budgets"] = dict(
            min_fraction=0.0,
            min_budget=preset.tune_budgets[-1],
            meaning=f"every evaluation, budgets from {preset.tune_budgets[-1]} steps "
            f"only (the small end from the early evaluations of longer runs)",
        )
    return out


def _curve(rs: list[dict], min_fraction: float) -> fit.Curve | None:
    """One configuration's seeds as a Curve, evaluations before min_fraction of the run left out."""
    first = max(1, round(min_fraction * rs[0]["steps"]))
    points = [[(e["flops"], e["val_loss"], e["test_loss"]) for e in r["evals"] if e["step"] >= first] for r in rs]
    return fit.seeds_curve(points) if points[0] else None


def _fits(preset: Preset, chosen: dict, rng, min_fraction: float, min_budget: int) -> tuple[dict, dict, dict]:
    """Per method the frontier, its power law and bootstrap; per non-BP method the comparison with BP."""
    fits, boots = {}, {}
    for method, configs in chosen.items():
        curves = [c for rs in configs if rs[0]["steps"] >= min_budget and (c := _curve(rs, min_fraction)) is not None]
        if not curves:
            continue
        grid = fit.budget_grid(curves)
        c, l = fit.frontier(curves, grid)
        entry = {
            "configurations": len(curves),
            "frontier": {"flops": c.tolist(), "test_loss": l.tolist()},
            "frontier_rises": fit.rises(c, l),
            "compute_decades": float(np.log10(c.max() / c.min())) if len(c) else 0.0,
        }
        fits[method] = entry
        try:
            law = fit.fit_power_law(c, l)
        except ValueError as err:
            entry["power_law"] = {"error": str(err)}
            continue
        boots[method] = boot = fit.bootstrap_laws(curves, grid, law, preset.resamples, rng)
        ok = [b for b in boot if b is not None]
        entry["power_law"] = {
            "alpha": law["alpha"],
            "E": law["E"],
            "A": law["A"],
            "objective": law["objective"],
            "alpha_ci": fit.interval([b["alpha"] for b in ok]),
            "E_ci": fit.interval([b["E"] for b in ok]),
            "resamples": len(ok),
            "form": "L(C) = E + A * C^-alpha, C in FLOPs",
            "_fit": law,
        }
    comparisons = {}
    for method in (m for m in preset.methods if m != "bp"):
        a, b = fits.get("bp", {}).get("power_law", {}), fits.get(method, {}).get("power_law", {})
        if "_fit" not in a or "_fit" not in b:
            continue
        # from the smallest compute both methods measured (no extrapolation downwards) to the
        # largest measured, extrapolated upwards by extrapolate_decades
        lo = max(min(fits[m]["frontier"]["flops"]) for m in ("bp", method))
        hi = max(max(fits[m]["frontier"]["flops"]) for m in ("bp", method)) * 10**preset.extrapolate_decades
        comparisons[method] = fit.compare(a["_fit"], b["_fit"], boots["bp"], boots[method], lo, hi)
        comparisons[method]["measured"] = _measured_difference(fits["bp"], fits[method])
        comparisons[method]["kind"] = (
            "baseline (only the head learns)"
            if method == "shallow"
            else "DFA placement"
            if method in DFA_METHODS
            else "family method"
        )
    return fits, boots, comparisons


def _measured_difference(bp: dict, other: dict) -> dict:
    """The frontiers' difference (other - BP) where both were measured, without any fit."""
    fb, fo = (np.asarray(f["frontier"]["flops"]) for f in (bp, other))
    lo, hi = max(fb.min(), fo.min()), min(fb.max(), fo.max())
    if lo >= hi:
        return {"overlap": None}
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), 12))
    diff = [
        float(
            np.exp(np.interp(np.log(g), np.log(fo), np.log(other["frontier"]["test_loss"])))
            - np.exp(np.interp(np.log(g), np.log(fb), np.log(bp["frontier"]["test_loss"])))
        )
        for g in grid
    ]
    return {
        "flops": grid.tolist(),
        "difference": diff,
        "min": min(diff),
        "max": max(diff),
        "other_better_share": float(np.mean([d < 0 for d in diff])),
    }


VERDICT_KEYS = (
    "verdict",
    "verdict_meaning",
    "confidence",
    "bootstrap_verdicts",
    "crossover_flops",
    "crossover_ci",
    "crossover_share",
    "E_difference",
    "E_difference_ci",
    "alpha_difference",
    "alpha_difference_ci",
    "horizon_flops",
)


def analyse(preset: Preset, runs: dict, flop_check_result: list | None = None, vocab: int = 256) -> dict:
    """Frontier fits with bootstrap CIs, L(N, D) fits, the verdict of each DFA placement, and the
    verdicts under the other readings of the frontier (`variants`)."""
    rng = np.random.default_rng(preset.seeds[0])
    chosen = selected(preset, runs)
    readings = variants(preset)
    primary = readings["primary"]
    fits, boots, comparisons = _fits(preset, chosen, rng, primary["min_fraction"], primary["min_budget"])
    sensitivity = {}
    for name, v in readings.items():
        f, _, c = (
            (fits, boots, comparisons)
            if name == "primary"
            else _fits(preset, chosen, rng, v["min_fraction"], v["min_budget"])
        )
        sensitivity[name] = {
            **v,
            "verdicts": {m: {k: c[m][k] for k in VERDICT_KEYS} for m in c},
            "fits": {
                m: {k: e["power_law"].get(k) for k in ("alpha", "E", "alpha_ci", "E_ci")}
                | {"compute_decades": e["compute_decades"]}
                for m, e in f.items()
                if "alpha" in e.get("power_law", {})
            },
        }
    bands = {m: _band(fits[m], boots[m]) for m in boots}
    for method, entry in fits.items():
        entry.get("power_law", {}).pop("_fit", None)
        entry["runs"] = [r["id"] for rs in chosen[method] for r in rs]
        entry["nd"] = _fit_nd(chosen[method])
    return {
        "runs": sorted(
            runs.values(),
            key=lambda r: (r["layers"], r["d_model"], r["method"], r["steps"], r["seed"], r["lr"], r["head_lr"]),
        ),
        "selected_runs": {m: [r["id"] for rs in cs for r in rs] for m, cs in chosen.items()},
        "tuning": _tuning_table(preset, runs),
        "tuning_grids": {m: tuning_grids(preset, m) for m in preset.methods},
        "fits": fits,
        "comparisons": comparisons,
        "verdicts": {
            m: {
                k: c[k]
                for k in (
                    "verdict",
                    "verdict_meaning",
                    "confidence",
                    "crossover_flops",
                    "crossover_ci",
                    "crossover_share",
                )
            }
            for m, c in comparisons.items()
            if m in compared(preset.methods)
        },
        "compared_methods": list(compared(preset.methods)),
        "sensitivity": sensitivity,
        "seed_spread": _seed_spread(chosen),
        "bands": bands,
        "flop_check": flop_check_result,
        "cost_ratios": _cost_ratios(preset, runs, vocab),
        "notes": {
            "verdict": "over [smallest compute both methods measured, largest measured x "
            "10^extrapolate_decades]; (A) DFA always "
            "better, (B) DFA better at scale, (C) BP better at scale, (D) BP always better; "
            "confidence: share of bootstrap resamples giving the same verdict",
            "extrapolate_decades": preset.extrapolate_decades,
            "frontier": "at each budget the configuration with the lowest validation loss (seeds "
            "averaged), its test loss reported; " + primary["meaning"],
            "tuning": "per size and tuning budget, seed 0, validation loss: the body rate (and warmup) "
            "at the head grid's middle, then the head rate at the chosen body rate; the same "
            "grids for every method that trains the group (tuning_grids)",
            "compute": "training FLOPs (analytic, matmuls incl. attention and head; cross-checked in "
            "flop_check); evaluation not counted",
            "loss": "nats per token (byte-level: per byte)",
        },
    }


def _cost_ratios(preset: Preset, runs: dict, vocab: int) -> dict:
    """Per size, each method's training FLOPs per token over BP's (analytic, as the fits count them)
    and its measured wall time per step over BP's (the median over the size's runs: load-dependent)."""
    out = {}
    for size in preset.sizes:
        flops = {m: flops_per_token(size, m, vocab, preset.context)["total"] for m in preset.methods}
        wall = {
            m: np.median(
                [
                    r["wall_s"] / r["steps"]
                    for r in runs.values()
                    if r["method"] == m
                    and (r["layers"], r["d_model"], r["heads"]) == tuple(size)
                    and r["status"] == "ok"
                ]
                or [np.nan]
            )
            for m in preset.methods
        }
        out["x".join(map(str, size))] = {
            m: {"flops": flops[m] / flops["bp"], "wall": float(wall[m] / wall["bp"])} for m in preset.methods
        }
    return out


def _seed_spread(chosen: dict) -> dict:
    """Per method, the standard deviation over seeds of the final test loss of each configuration
    run with several seeds."""
    out = {}
    for method, configs in chosen.items():
        stds = [float(np.std([r["evals"][-1]["test_loss"] for r in rs], ddof=1)) for rs in configs if len(rs) > 1]
        if stds:
            out[method] = {"configurations": len(stds), "mean_std": float(np.mean(stds)), "max_std": max(stds)}
    return out


def _fit_nd(configs: list[list[dict]]) -> dict:
    try:
        return fit.fit_nd(
            [rs[0]["non_embedding_parameters"] for rs in configs],
            [rs[0]["tokens"] for rs in configs],
            [float(np.mean([r["evals"][-1]["test_loss"] for r in rs])) for rs in configs],
        ) | {
            "form": "L(N, D) = E + A/N^alpha + B/D^beta; N non-embedding parameters, D training tokens; each "
            "configuration's final test loss (seeds averaged)"
        }
    except ValueError as err:
        return {"error": str(err)}


def _band(entry: dict, boot: list, points: int = 60) -> dict:
    c = np.asarray(entry["frontier"]["flops"])
    grid = np.exp(np.linspace(np.log(c.min()), np.log(c.max()), points))
    preds = np.array([fit.predict(b, grid) for b in boot if b is not None])
    return {
        "flops": grid.tolist(),
        "low": np.quantile(preds, 0.025, 0).tolist(),
        "high": np.quantile(preds, 0.975, 0).tolist(),
        "fit": fit.predict(entry["power_law"]["_fit"], grid).tolist(),
    }


def _tuning_table(preset: Preset, runs: dict) -> list[dict]:
    """Every tuning budget's grid runs per size and method, the choice, and whether it sits at an
    edge of a grid (where a wider grid could have done better)."""
    rows, seed = [], preset.seeds[0]
    for size in range(len(preset.sizes)):
        for budget in preset.tune_budgets:
            for method in preset.methods:
                grid = tuning_runs(preset, runs, size, method, budget)
                if grid is None:
                    continue
                best = _best(grid)
                edges = [
                    g
                    for g in groups(method)
                    if best["lr" if g == "body" else "head_lr"] in (preset.lr_grid[g][0], preset.lr_grid[g][-1])
                ]
                rows.append(
                    {
                        "size": list(preset.sizes[size]),
                        "method": method,
                        "steps": budget,
                        "seed": seed,
                        "grid": [
                            {
                                "lr": r["lr"],
                                "head_lr": r["head_lr"],
                                "warmup": r["warmup"],
                                "val_loss": r["final_val_loss"],
                                "status": r["status"],
                            }
                            for r in grid
                        ],
                        "chosen": {"lr": best["lr"], "head_lr": best["head_lr"], "warmup": best["warmup"]},
                        "at_grid_edge": edges,
                    }
                )
    return rows


# ---------------------------------------------------------------- plots
COLORS = {
    "bp": "#1f77b4",
    "dfa-macro": "#d62728",
    "dfa-micro": "#ff7f0e",
    "dfa-linear": "#2ca02c",
    "shallow": "#7f7f7f",
}
FAMILY_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def color(method: str) -> str:
    """A method's colour: its own for METHODS, else one of FAMILY_COLORS picked by its name."""
    if method in COLORS:
        return COLORS[method]
    return FAMILY_COLORS[zlib.crc32(method.encode()) % len(FAMILY_COLORS)]


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for method, ids in result["selected_runs"].items():
        for r in (r for r in result["runs"] if r["id"] in ids):
            e = r["evals"]
            ax.plot(
                [p["flops"] for p in e],
                [p["test_loss"] for p in e],
                color=color(method),
                alpha=0.35,
                lw=0.9,
                marker=".",
                ms=3,
            )
        band = result["bands"].get(method)
        if band:
            law = result["fits"][method]["power_law"]
            ax.plot(
                band["flops"],
                band["fit"],
                color=color(method),
                lw=2.2,
                label=f"{method}: α={law['alpha']:.3f}, E={law['E']:.2f}",
            )
    ax.set(
        xscale="log",
        xlabel="training compute (FLOPs)",
        ylabel="test loss (nats/token)",
        title="Loss vs compute: every selected run (thin), fitted frontier L = E + A·C^-α (thick)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths.append(save_figure(fig, out / "scaling.png", dpi=120))

    fig, ax = plt.subplots(figsize=(8, 5.2))
    for method, band in result["bands"].items():
        f = result["fits"][method]
        ax.fill_between(band["flops"], band["low"], band["high"], color=color(method), alpha=0.2)
        ax.plot(band["flops"], band["fit"], color=color(method), lw=2, label=method)
        ax.plot(f["frontier"]["flops"], f["frontier"]["test_loss"], "o", color=color(method), ms=3)
    measured = [l for f in result["fits"].values() for l in f["frontier"]["test_loss"]]
    ax.set(
        xscale="log",
        xlabel="training compute (FLOPs)",
        ylabel="test loss (nats/token)",
        ylim=(min(measured) - 0.1, max(measured) + 0.25),
        title="Compute-efficient frontiers (points) and fits with 95% bootstrap bands",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    paths.append(save_figure(fig, out / "scaling_frontiers.png", dpi=120))
    return paths


def describe_plan(preset_name: str, vocab: int = 256, methods: list[str] | None = None) -> str:
    """The runs of a preset, their estimated time and stages (``dfa-kernels scaling --plan``)."""
    preset = with_methods(PRESETS[preset_name], methods)
    lines = [
        f"preset {preset_name}: sizes {[list(s) for s in preset.sizes]}, context {preset.context}, batch "
        f"{preset.batch}, budgets {list(preset.budgets)} steps (tuned at {list(preset.tune_budgets)}), seeds "
        f"{list(preset.seeds)}, methods {list(preset.methods)}; grids {preset.lr_grid}, warmup "
        f"{list(preset.warmup_grid)}; time estimates at {preset.assumed_flop_rate:.0e} FLOP/s + "
        f"{preset.step_overhead_s:g} s per step"
    ]
    for k, stage in enumerate(stages(preset, vocab), 1):
        secs = sum(estimated_seconds(j, preset, vocab) for j in stage)
        sizes = sorted({j.size for j in stage})
        lines.append(
            f"  stage {k}: {len(stage)} runs, ~{secs / 60:.1f} min, sizes {[list(preset.sizes[i]) for i in sizes]}"
        )
    total = sum(estimated_seconds(j, preset, vocab) for j in jobs(preset))
    lines.append(f"  total: {len(jobs(preset))} runs, ~{total / 60:.0f} min")
    return "\n".join(lines)


def summary(result: dict) -> str:
    """The fitted exponents and the verdicts, and the verdicts under each reading of the frontier,
    as Markdown tables."""

    def ci(pair, fmt):
        return "—" if pair is None else f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"

    lines = [
        "| method | α (95% CI) | E (95% CI) | compute decades "
        "| crossover with BP, FLOPs (95% CI; share of resamples) | verdict (confidence) |",
        "|---|---|---|---|---|---|",
    ]
    for method, f in result["fits"].items():
        law = f.get("power_law", {})
        if "alpha" not in law:
            lines.append(f"| {method} | not fitted: {law.get('error')} | | | | |")
            continue
        c = result["comparisons"].get(method)
        cross = verdict = "—"
        if c is not None:
            at = "none" if c["crossover_flops"] is None else f"{c['crossover_flops']:.2e}"
            cross = f"{at} ({ci(c['crossover_ci'], '.1e')}; {c['crossover_share']:.2f})"
            verdict = f"({c['verdict']}) {c['verdict_meaning']} ({c['confidence']:.2f})"
        lines.append(
            f"| {method} | {law['alpha']:.3f} {ci(law['alpha_ci'], '.3f')} | {law['E']:.3f} "
            f"{ci(law['E_ci'], '.3f')} | {f['compute_decades']:.2f} | {cross} | {verdict} |"
        )
    verdicts = result.get("compared_methods", DFA_METHODS)
    lines += ["", "| reading of the frontier | " + " | ".join(verdicts) + " |", "|---|" + "---|" * len(verdicts)]
    for name, v in result["sensitivity"].items():
        cells = []
        for m in verdicts:
            c = v["verdicts"].get(m)
            cells.append(
                "—"
                if c is None
                else f"({c['verdict']}) {c['confidence']:.2f}; E diff {c['E_difference']:+.3f} "
                f"{ci(c['E_difference_ci'], '+.3f')}"
            )
        lines.append(f"| {name}: {v['meaning']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
