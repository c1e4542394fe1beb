"""Alignment: does DFA's signal point where backprop's gradient points? (paper 1's control)

:func:`alignment` takes a model with DFA feedback points, a loss function and one batch, and runs
the training step's forward and backward twice on the same weights: once in mode "dfa", once in
mode "bp" (the model's own exact-gradient mode; no second copy of the model). For every feedback
point it compares

- the **signal**: what DFA delivers to the point's tensor (``scale * e @ B_l``, times f'(a) for a
  fused point) against backprop's gradient at the same tensor. Per sample (one row of the error:
  a node, a token, a ray sample, ...), the cosine of the two; reported as mean and std over up to
  ``samples`` rows where both are non-zero (paper 1's convention counts rows where both are zero
  as 1: ``cos_mean_paper``, over all rows), the angle of the mean, and the cosine of the whole
  flattened tensors;
- the **update**: the DFA weight update of the parameters the point trains (found by walking the
  DFA pass's autograd graph from the point back to the previous points) against their BP gradient,
  as one cosine over those parameters flattened together, and one per parameter tensor;

and, network-wide, the cosine between all DFA-trained parameters' updates concatenated. Layers
after the last point (the output layers) learn exactly in both modes and are left out.

The measurement does not change training: no optimizer step; parameters' ``.grad``, every buffer
(batch-norm statistics), the RNG states (torch CPU and CUDA, numpy, Python) and each DFA module's
mode are restored. By default it runs in train mode, both passes starting from the same RNG state so
that dropout draws the same masks in both (``eval_mode=True`` measures in eval mode instead); the
JSON says which (``measured_in``).

For a **layer-wise** method (``mode="fa"``, "usf", "brsf", "frsf": a model whose layers
``dk.convert`` made feedback layers) there are no points: the same two passes compare, per feedback
layer, the gradient at its output (the signal that trains it: ``g @ B`` arrived from the layer
above, against backprop's ``g @ W``; per sample) and its weight update; "network" is the update of
every feedback layer but the last one the forward calls (the output layer, exact in every method),
"deepest" the first one it calls. The result holds "layers" in place of "dfa_modules".

:func:`plot_alignment` draws measurements taken along training. The measurement is part of the
core (``dk.alignment``), below the zoo's trainer (``alignment_every``) and the study that uses it
(``dfa-kernels align TASK``: :mod:`dfa_kernels.studies.alignment`).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import methods
from .figures import save_figure
from .layerwise import FeedbackLayer
from .nn import DFA

SAMPLES = 512  # paper 1 measured alignment on 512 samples
TINY = 1e-30  # norms at or below this count as zero


# ---------------------------------------------------------------- state that must survive a measurement
class _Snapshot:
    """Everything a measurement may touch, restored by :meth:`restore` (and RNG by :meth:`reseed`)."""

    def __init__(self, model: nn.Module, dfas: list[DFA]) -> None:
        self.model = model
        # feedback layers: brsf's draw counter (a pass in brsf draws), a standalone layer's own mode
        layers = [m for m in model.modules() if isinstance(m, FeedbackLayer)]
        self.layers = [(m, m.draws, m.mode if m.source is None else None) for m in layers]
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.training = [(m, m.training) for m in model.modules()]
        self.modes = [(d, d.mode) for d in dfas]
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.numpy_rng = np.random.get_state()
        self.python_rng = random.getstate()

    def reseed(self) -> None:
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)

    def reset_buffers(self) -> None:
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)

    def restore(self) -> None:
        self.reseed()
        self.reset_buffers()
        for p, grad in self.grads:
            p.grad = grad
        for module, training in self.training:
            module.training = training
        for dfa, mode in self.modes:
            dfa.mode = mode
        for layer, draws, own_mode in self.layers:
            layer.draws = draws
            if own_mode is not None:
                layer.mode = own_mode


def _dfa_modules(model: nn.Module, required: bool = True) -> list[tuple[str, DFA]]:
    seen, found = set(), []
    for name, module in model.named_modules():
        if isinstance(module, DFA) and id(module) not in seen:
            seen.add(id(module))
            found.append((name or "dfa", module))
    if not found and required:
        raise ValueError("alignment: the model has no dk.DFA module (nothing to measure)")
    return found


def _pass(model, dfas, loss_fn, batch, mode: str, reach: bool = True):
    """One forward + backward in `mode`; returns (loss, captures, parameter grads by id, and the
    parameters each point reaches, when `reach`)."""
    for _, dfa in dfas:
        dfa.mode = mode
    for p in model.parameters():
        p.grad = None
    with contextlib.ExitStack() as stack:
        captures = [stack.enter_context(dfa.capture()) for _, dfa in dfas]
        loss = loss_fn(model, batch)
        reached = [[_parameters_reached(r) for r in cap.points] for cap in captures] if reach else None
        loss.backward()
    grads = {id(p): (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    return float(loss.detach()), captures, grads, reached


def _parameters_reached(record) -> list[torch.Tensor]:
    """The leaf tensors (parameters) whose gradient flows from this point in the first pass (mode
    "dfa": its tensor's autograd graph back to the previous, detached, points), plus a fused linear
    point's own weight and bias, and its input's graph when that input requires a gradient."""
    found = [t for t in (record.weight, record.bias) if t is not None]
    roots = [t for t in (record.tensor, record.layer_input) if t is not None]
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    found += [t for t in roots if t.is_leaf and t.requires_grad]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            found.append(variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


# ---------------------------------------------------------------- cosines
def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na <= TINY or nb <= TINY:
        return None
    return float((a @ b) / (na * nb))


def _angle(cos: float | None) -> float | None:
    return None if cos is None else math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _signal_stats(dfa_signal, bp_grad, width: int, samples: int) -> dict:
    if dfa_signal is None or bp_grad is None:
        return {
            "cos_mean": None,
            "cos_std": None,
            "samples": 0,
            "angle_deg": None,
            "cos_flat": None,
            "cos_mean_paper": None,
            "note": "no signal" if dfa_signal is None else "no BP gradient",
        }
    a = dfa_signal.detach().double().reshape(-1, width)
    b = bp_grad.detach().double().reshape(-1, width)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    both = (na > TINY) & (nb > TINY)
    cos_rows = (a * b).sum(1) / (na * nb).clamp_min(TINY)
    used = cos_rows[both][:samples]
    # paper 1 (TinyDFA's measurement): every row, those where both are zero counted as aligned (1)
    paper = torch.where((na <= TINY) & (nb <= TINY), torch.ones_like(cos_rows), cos_rows * both)
    mean = float(used.mean()) if used.numel() else None
    return {
        "cos_mean": mean,
        "cos_std": float(used.std()) if used.numel() > 1 else None,
        "samples": int(used.numel()),
        "rows": int(a.shape[0]),
        "angle_deg": _angle(mean),
        "cos_flat": _cos(a, b),
        "cos_mean_paper": float(paper.mean()),
    }


def _update_stats(params, names, dfa_grads, bp_grads) -> dict:
    def flat(grads, p):
        g = grads.get(id(p))
        return torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g is None else g.double().flatten()

    per_param = {names[id(p)]: _cos(flat(dfa_grads, p), flat(bp_grads, p)) for p in params}
    if not params:
        return {"cos": None, "angle_deg": None, "parameters": {}, "numel": 0}
    cos = _cos(torch.cat([flat(dfa_grads, p) for p in params]), torch.cat([flat(bp_grads, p) for p in params]))
    return {"cos": cos, "angle_deg": _angle(cos), "parameters": per_param, "numel": sum(p.numel() for p in params)}


# ---------------------------------------------------------------- the measurement
def alignment(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    *,
    samples: int = SAMPLES,
    eval_mode: bool = False,
    mode: str = "dfa",
) -> dict[str, Any]:
    """Alignment of DFA with backprop for `model` on one `batch` (see the module docstring).

    loss_fn(model, batch) -> scalar loss: the training loss (its forward must run the model's DFA
    outputs). Returns a JSON-ready dict: per DFA module, per point, "signal" and "update" stats;
    "network" (all DFA-trained parameters); "deepest" (the first point of the first DFA module:
    the DFA-trained layer farthest from the output); "measured_in". `mode` is the mode compared
    with backprop: "dfa" or another direct method (its own signal: sign(e), q(e), the target, a
    learned B), or "bp" as a control (every cosine is then 1).
    """
    if mode not in methods.DIRECT + methods.LAYERWISE + ("bp",):
        raise ValueError(
            f"alignment: mode must be a direct method ({', '.join(methods.DIRECT)}), a layer-wise one "
            f"({', '.join(methods.LAYERWISE)}) or 'bp' (the control); got {mode!r}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"alignment: model must be an nn.Module; got {type(model).__name__}")
    if mode in methods.LAYERWISE:
        return _layerwise_alignment(model, loss_fn, batch, samples, eval_mode, mode)
    dfas = _dfa_modules(model)
    names = {id(p): n for n, p in model.named_parameters()}
    snapshot = _Snapshot(model, [d for _, d in dfas])
    try:
        if eval_mode:
            model.eval()
        snapshot.reseed()
        loss_dfa, caps_dfa, grads_dfa, reached = _pass(model, dfas, loss_fn, batch, mode)
        snapshot.reseed()
        snapshot.reset_buffers()
        loss_bp, caps_bp, grads_bp, _ = _pass(model, dfas, loss_fn, batch, "bp", reach=False)
    finally:
        snapshot.restore()

    modules: dict[str, dict[str, Any]] = {}
    trained: dict[int, torch.Tensor] = {}
    for (name, dfa), cap_dfa, cap_bp, reached_points in zip(dfas, caps_dfa, caps_bp, reached):
        assert dfa.spec is not None  # fixed by the passes above
        points = []
        for index, (record, signal, grad, params) in enumerate(
            zip(cap_dfa.points, cap_dfa.signals, cap_bp.signals, reached_points)
        ):
            params = list({id(p): p for p in params if id(p) in names}.values())
            trained.update({id(p): p for p in params})
            width = dfa.spec.widths[index]
            points.append(
                {
                    "index": index,
                    "shape": list(record.tensor.shape),
                    "width": width,
                    "activation": record.activation,
                    "trains": [names[id(p)] for p in params],
                    "signal": _signal_stats(signal, grad, width, samples),
                    "update": _update_stats(params, names, grads_dfa, grads_bp),
                }
            )
        modules[name] = {
            "points": points,
            "feedback": {"layout": dfa.layout, "distribution": dfa.distribution, "scale": dfa.scale},
        }
    network = _update_stats(list(trained.values()), names, grads_dfa, grads_bp)
    first_name = next(iter(modules))
    deepest = modules[first_name]["points"][0]
    return {
        **_header(mode, eval_mode, loss_dfa, loss_bp, samples),
        "dfa_modules": modules,
        "network": _network(network, len(trained)),
        "deepest": {
            "dfa": first_name,
            "point": 0,
            "signal_cos_mean": deepest["signal"]["cos_mean"],
            "signal_cos_std": deepest["signal"]["cos_std"],
            "update_cos": deepest["update"]["cos"],
        },
    }


def _header(mode: str, eval_mode: bool, loss: float, loss_bp: float, samples: int) -> dict[str, Any]:
    """The fields a measurement reports first, for the points (direct) and the layers (layer-wise)."""
    measured_in = (
        "eval mode (dropout off, batch-norm running statistics)"
        if eval_mode
        else "train mode; both passes from the same RNG state (same dropout masks); "
        "batch-norm statistics, gradients and RNG restored afterwards"
    )
    return {
        "compared": f"mode {mode!r} against backprop",
        "measured_in": measured_in,
        "loss": loss,
        "loss_bp_pass": loss_bp,
        "samples_max": samples,
    }


def _network(network: dict, parameters: int) -> dict[str, Any]:
    """The network-wide update statistics (from :func:`_update_stats`) as reported."""
    return {
        "update_cos": network["cos"],
        "update_angle_deg": network["angle_deg"],
        "parameters": parameters,
        "numel": network["numel"],
    }


def _layer_pass(model, dfas, layers, loss_fn, batch, mode: str):
    """One forward + backward in `mode` (every DFA module and standalone feedback layer set to it);
    returns (loss, each layer's output gradient, its rows' width, the layers in forward-call order,
    parameter grads by id). A layer called more than once: its calls' gradients, row-concatenated."""
    for dfa in dfas:
        dfa.mode = mode
    for _, layer in layers:
        if layer.source is None:
            layer.mode = mode
    for p in model.parameters():
        p.grad = None
    outs: dict[str, list[torch.Tensor]] = {}
    widths: dict[str, int] = {}
    order: list[str] = []

    def hook(name):
        def record(module, inputs, output):
            if name not in order:
                order.append(name)
            # a row per sample: [..., out] for a linear layer, [N, C*H*W] for a convolution
            widths[name] = output.shape[-1] if isinstance(module, nn.Linear) else output[0].numel()
            if output.requires_grad:
                output.register_hook(lambda g: outs.setdefault(name, []).append(g.detach().clone()))

        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers]
    try:
        loss = loss_fn(model, batch)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    signals = {n: torch.cat([g.reshape(-1, widths[n]) for g in gs]) for n, gs in outs.items()}
    grads = {id(p): (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    return float(loss.detach()), signals, widths, order, grads


def _layerwise_alignment(model, loss_fn, batch, samples: int, eval_mode: bool, mode: str) -> dict[str, Any]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FeedbackLayer)]
    if not layers:
        raise ValueError(
            f"alignment: mode {mode!r} is layer-wise and the model has no feedback layers "
            "(dk.convert(model, mode=...) makes them)"
        )
    dfas = [d for _, d in _dfa_modules(model, required=False)]
    names = {id(p): n for n, p in model.named_parameters()}
    snapshot = _Snapshot(model, dfas)
    try:
        if eval_mode:
            model.eval()
        snapshot.reseed()
        loss_m, signals_m, widths, order, grads_m = _layer_pass(model, dfas, layers, loss_fn, batch, mode)
        snapshot.reseed()
        snapshot.reset_buffers()
        loss_bp, signals_bp, _, _, grads_bp = _layer_pass(model, dfas, layers, loss_fn, batch, "bp")
    finally:
        snapshot.restore()
    if not order:
        raise ValueError("alignment: the loss's forward called none of the model's feedback layers")
    by_name = dict(layers)
    entries = []
    for name in order:
        params = [p for p in by_name[name].parameters(recurse=False) if id(p) in names]
        entries.append(
            {
                "name": name,
                "width": widths[name],
                "trains": [names[id(p)] for p in params],
                "signal": _signal_stats(signals_m.get(name), signals_bp.get(name), widths[name], samples),
                "update": _update_stats(params, names, grads_m, grads_bp),
            }
        )
    trained = [p for name in order[:-1] for p in by_name[name].parameters(recurse=False) if id(p) in names]
    network = _update_stats(trained, names, grads_m, grads_bp)
    deepest = entries[0]
    return {
        **_header(mode, eval_mode, loss_m, loss_bp, samples),
        "layers": entries,
        "network": _network(network, len(trained)),
        "deepest": {
            "layer": deepest["name"],
            "signal_cos_mean": deepest["signal"]["cos_mean"],
            "signal_cos_std": deepest["signal"]["cos_std"],
            "update_cos": deepest["update"]["cos"],
        },
    }


# ---------------------------------------------------------------- over training: the plot
def _curves(measurements: list[dict[str, Any]]):
    """(label, deepest?, that point's or layer's entry in each measurement) per point (a direct
    method) or feedback layer (a layer-wise one)."""
    first = measurements[0]
    if "layers" in first:
        for index, layer in enumerate(first["layers"]):
            yield layer["name"], index == 0, [m["layers"][index] for m in measurements]
        return
    for module, info in first["dfa_modules"].items():
        for point in info["points"]:
            deepest = module == first["deepest"]["dfa"] and point["index"] == 0
            label = f"{module}#{point['index']} ({', '.join(point['trains'][:2]) or '-'})"
            yield label, deepest, [m["dfa_modules"][module]["points"][point["index"]] for m in measurements]


def plot_alignment(measurements: list[dict[str, Any]], path: str | Path, title: str = "alignment") -> Path:
    """Per-sample signal cosine (left) and update cosine (right) of every point (or feedback layer)
    over training steps, one line each; the deepest (farthest from the output) drawn thick and black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in measurements]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, deepest, entries in _curves(measurements):
        style = dict(color="black", linewidth=2.5, zorder=3) if deepest else dict(linewidth=1, alpha=0.8)
        for ax, key, field in ((axes[0], "signal", "cos_mean"), (axes[1], "update", "cos")):
            ax.plot(
                steps,
                [np.nan if e[key][field] is None else e[key][field] for e in entries],
                label=label + (" — deepest" if deepest else ""),
                **style,
            )
    axes[0].set_title("signal: per-sample cosine (mean)")
    axes[1].set_title("weight update: cosine with the BP gradient")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylim(-0.2, 1.0)
        ax.axhline(0, color="grey", linewidth=0.5)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(labels) > 12:  # many points: the legend names the deepest one only
        keep = [i for i, label in enumerate(labels) if label.endswith("deepest")]
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
    axes[1].legend(handles, labels, fontsize=7, loc="lower right")
    fig.suptitle(title)
    return save_figure(fig, path)
