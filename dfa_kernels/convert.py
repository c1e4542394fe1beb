"""Drop-in DFA for an existing model: feedback points inserted without touching its forward.

``dk.convert(model, points=...)`` puts a feedback point at the output of chosen modules (forward
hooks: the model's code, its module tree and its parameter names stay as they were) and wraps the
model's output in the DFA output op. Where the points go:

- ``points=None`` (default): after every activation module: torch's (``nn.ReLU``, ``nn.GELU``, ...)
  and those of known libraries (``transformers.activations``, timm's ``timm.layers.activations*``),
  recognised by their class's module, so neither library is imported.
- a glob over ``named_modules()`` names, or a list of them: ``"transformer.h.*"`` is every block
  of a GPT-2 (``*`` matches one dotted name component, ``**`` any number, ``?`` one character).
- module types (``nn.Linear`` or a tuple of types), or a callable ``(name, module) -> bool``.

**Residual models.** A point detaches its tensor from the graph below it, so in a sequential
network every layer learns from one signal: its point's feedback (or, after the last point, the
exact gradient). In a residual network, ``x + f(x)`` with a point inside ``f`` leaves the
residual stream ``x`` attached: backprop gradients from the output (and from the points above)
flow down the stream, around the points, into every lower layer. The layers below such a point
then learn from backprop and DFA at once, a hybrid nobody asked for. ``DFAModel`` checks the
autograd graph of its first DFA step for exactly this (a non-parameter node reached from two
sources: the output, or two points) and warns once, naming the modules that get mixed gradients.
The faithful choices are points on the stream after every block (``points="blocks.*"``: paper 1's
"macro" placement), or points inside the blocks *and* on the stream (after every block, plus an
``input_points=`` point at the first block's input) so that the stream is cut at every block
boundary ("micro"); ``detach=`` cuts a module's input without a point.
:mod:`dfa_kernels.huggingface` builds these placements for Hugging Face causal LMs.

**Layer-wise methods** (``mode="fa"``, "usf", "brsf", "frsf": :mod:`dfa_kernels.layerwise`) change
the layers themselves, not the points: ``convert`` replaces every ``nn.Linear``, ``nn.Conv2d`` and
PyG ``Linear`` (the weight layer of GCNConv, ChebConv and others; message passing keeps its exact
transpose: only synaptic weights get a feedback matrix), or those ``layers=`` chooses, by a
:class:`~dfa_kernels.layerwise.FeedbackLinear` / ``FeedbackConv2d`` sharing its parameters, under
the same name (no hook: their forward applies an autograd function). They read the mode of
``converted.dfa`` live: plain layers in the other modes, so one converted model runs every method.
Points are still inserted where ``points`` says (none needed: a model without activation modules
converts too), for the direct modes.
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from . import methods
from .autograd import Record
from .layerwise import FeedbackConv2d, FeedbackLinear, layer_seed
from .nn import DFA

# What chooses modules (convert's points=, input_points=, detach=, layers=): a module-name glob, a module
# type, a list/tuple/set of those, or a callable (name, module) -> bool.
ModulePredicate = Callable[[str, nn.Module], bool]
Selector = str | type[nn.Module] | ModulePredicate | Collection[str | type[nn.Module]]

# Module types after which `convert` inserts a feedback point by default.
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.GLU,
)
# Libraries whose activation modules count too, by the module their class is defined in (prefixes).
ACTIVATION_LIBRARIES = ("transformers.activations", "timm.layers.activations", "timm.models.layers.activations")
# Classes of those modules that are not activations (identity maps).
NOT_ACTIVATIONS = ("LinearActivation", "Identity")


class HybridGradientWarning(UserWarning):
    """The residual stream carries backprop gradients past feedback points (see :mod:`dfa_kernels.convert`)."""


def is_activation(module: nn.Module) -> bool:
    """Whether `module` is an activation module of torch, transformers or timm (no import needed)."""
    if isinstance(module, ACTIVATIONS):
        return True
    for cls in type(module).__mro__:
        if cls.__module__.startswith(ACTIVATION_LIBRARIES) and cls.__name__ not in NOT_ACTIVATIONS:
            return True
    return False


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A module-name glob as a regex: ``*`` one dotted component, ``**`` any number, ``?`` one
    character, ``[...]`` a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + re.escape(body[1:]) if body.startswith("!") else re.escape(body)) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _name_matches(rx: re.Pattern[str]) -> ModulePredicate:
    return lambda name, m: rx.match(name) is not None


def _instance_of(t: type[nn.Module]) -> ModulePredicate:
    return lambda name, m: isinstance(m, t)


def select_modules(model: nn.Module, where: Selector | None, argument: str = "points") -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of `model` that `where` selects, in ``named_modules()`` order (each
    module once, the root never). `where`: None (activation modules), a glob or list of globs, a
    module type or tuple/list of types, or a callable ``(name, module) -> bool``."""
    predicates: list[ModulePredicate]
    if where is None:
        predicates = [lambda name, m: is_activation(m)]
    elif callable(where) and not isinstance(where, type):
        predicates = [where]
    else:
        items = list(where) if isinstance(where, (list, tuple, set, frozenset)) else [where]
        if not items:
            raise ValueError(
                f"{argument} must name at least one module (a glob, a module type or a callable); "
                f"got an empty {type(where).__name__}"
            )
        predicates = []
        for item in items:
            if isinstance(item, str):
                predicates.append(_name_matches(glob_regex(item)))
            elif isinstance(item, type) and issubclass(item, nn.Module):
                predicates.append(_instance_of(item))
            else:
                raise TypeError(
                    f"{argument} must be module-name globs (str), nn.Module subclasses or a callable "
                    f"(name, module) -> bool; got {item!r} of type {type(item).__name__}"
                )
    # every name a module goes by (a module shared under two names matches either); each module
    # is chosen once, under its first name
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and not isinstance(m, DFA)]
    first: dict[int, str] = {}
    for n, m in named:
        first.setdefault(id(m), n)
    chosen: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for n, m in named:
        if id(m) not in seen and any(p(n, m) for p in predicates):
            seen.add(id(m))
            chosen.append((first[id(m)], m))
    if isinstance(where, (str, list, tuple)):  # a glob that matches nothing is a typo: say so
        for item in [where] if isinstance(where, str) else where:
            if isinstance(item, str) and not any(glob_regex(item).match(n) for n, _ in named):
                near = difflib.get_close_matches(item, [n for n, _ in named], n=3, cutoff=0.4)
                raise ValueError(
                    f"{argument}: the glob {item!r} matches no module name of the model "
                    f"(names look like {near or [n for n, _ in named[:3]]}; '*' matches one "
                    f"dotted component, '**' several)"
                )
    return chosen


# ---------------------------------------------------------------- tensors inside module inputs/outputs
def _replace_first_tensor(value: Any, fn: Callable[[torch.Tensor], torch.Tensor], what: str) -> Any:
    """`value` with its first tensor (itself, or the first tensor item of a tuple, list or mapping,
    e.g. a Hugging Face ModelOutput) replaced by ``fn(tensor)``."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, torch.Tensor):
                out = cast(MutableMapping, copy.copy(value))  # outputs are mutable (dict, ModelOutput)
                out[key] = fn(item)
                return out
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                items = list(value)
                items[index] = fn(item)
                if isinstance(value, list):
                    return items
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    raise TypeError(f"{what} holds no tensor (got {type(value).__name__}): it cannot carry a feedback point")


# The keyword names a module's main input goes by, tried in this order when it is not positional.
INPUT_KEYWORDS = ("hidden_states", "x", "input", "inputs", "inputs_embeds")


def _replace_input(
    module_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) with the module's main input tensor (first tensor argument) replaced by fn(it)."""
    for index, item in enumerate(args):
        if isinstance(item, torch.Tensor):
            return args[:index] + (fn(item),) + args[index + 1 :], kwargs
    keys = [k for k in INPUT_KEYWORDS if isinstance(kwargs.get(k), torch.Tensor)]
    keys += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in keys]
    if not keys:
        raise TypeError(
            f"module {module_name!r} was called without a tensor argument: its input cannot carry a feedback point"
        )
    return args, {**kwargs, keys[0]: fn(kwargs[keys[0]])}


class PointTrace:
    """The names of the points a forward records, in order, while `active` (the converted model's
    first DFA step, whose gradient paths it checks)."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.names: list[str] = []

    def add(self, name: str) -> None:
        if self.active:
            self.names.append(name)


class FeedbackPoint:
    """A forward hook: the module's output (its first tensor) becomes a feedback point of `dfa`."""

    def __init__(self, dfa: DFA, name: str, trace: PointTrace | None = None) -> None:
        self.dfa, self.name, self.trace = dfa, name, trace or PointTrace(False)

    def record(self, h: torch.Tensor) -> torch.Tensor:
        self.trace.add(self.name)
        return self.dfa.point(h)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _replace_first_tensor(output, self.record, f"the output of module {self.name!r}")


class InputPoint(FeedbackPoint):
    """A forward pre-hook: the module's input (its first tensor argument) becomes a feedback point."""

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _replace_input(self.name, args, kwargs, self.record)


class DetachInput:
    """A forward pre-hook: the module's input (first tensor argument) is detached (no point), as
    points detach theirs: in modes "dfa" and "shallow", not in "bp"."""

    def __init__(self, dfa: DFA, name: str) -> None:
        self.dfa, self.name = dfa, name

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if methods.passes_gradients(self.dfa.mode):
            return None
        return _replace_input(self.name, args, kwargs, torch.Tensor.detach)


class OutputHook:
    """A forward hook: the module's output (first tensor) is the DFA output y of `owner`."""

    owner: DFAModel

    def __init__(self, owner: DFAModel, name: str) -> None:
        self.__dict__["owner"] = owner  # a reference: the hook is not a submodule
        self.name = name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _replace_first_tensor(output, self.owner.dfa_output, f"the output of module {self.name!r}")


# Activation modules `convert(fuse=True)` folds into the linear layer before them.
FUSABLE = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}


def _fused_name(module: nn.Module) -> str | None:
    name = FUSABLE.get(type(module))
    if isinstance(module, nn.GELU) and module.approximate != "none":
        return None  # the fused epilogue implements the exact (erf) GELU
    return name


class DFALinear(nn.Linear):
    """A linear layer + activation run as ``dfa.linear(x, self, activation)`` (added by
    ``convert(fuse=True)``). It shares the original layer's parameters, under the same names."""

    dfa: DFA  # references, not submodules (set in __dict__)
    point_name: str
    trace: PointTrace

    def __init__(
        self, linear: nn.Linear, activation: str, dfa: DFA, name: str = "", trace: PointTrace | None = None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.activation = activation
        self.__dict__["dfa"] = dfa  # a reference, not a submodule
        self.__dict__["point_name"], self.__dict__["trace"] = name, trace or PointTrace(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trace.add(self.point_name)
        return self.dfa.linear(x, self, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


# ---------------------------------------------------------------- the converted model
def _output_key(result: Any, output: str | int | None) -> str | int | None:
    """Which item of a forward's result is the DFA output: `output` if given, else "logits" when
    the result is a mapping that has it, else its first tensor."""
    if output is not None:
        return output
    if isinstance(result, Mapping):
        if "logits" in result:
            return "logits"
        return next((k for k, v in result.items() if isinstance(v, torch.Tensor)), None)
    if isinstance(result, (tuple, list)):
        return next((i for i, v in enumerate(result) if isinstance(v, torch.Tensor)), None)
    return None


class DFAModel(nn.Module):
    """A converted model: runs `model` and takes its output (or `output_module`'s) as the DFA output.

    ``dfa`` is the :class:`DFA` (switch ``converted.dfa.mode`` live); ``points`` names the modules
    carrying points. Points left pending by an earlier forward that never reached its output (it
    raised, or ``dfa.point`` was called outside a forward) are discarded with a warning when the
    next forward starts, so they never mix with its own.
    """

    def __init__(
        self, model: nn.Module, dfa: DFA, output: str | int | None = None, output_module: str | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.dfa = dfa
        self.output, self.output_module = output, output_module
        self.points: tuple[str, ...] = ()  # filled in by `attach`
        self.layers: tuple[str, ...] = ()  # the layers with layer-wise feedback (FeedbackLinear/Conv2d)
        self.trace = PointTrace(False)  # active until the first DFA step has been checked

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.begin_forward()
        try:
            result = self.model(*args, **kwargs)
            if self.output_module is None:
                return self._wrap_result(result)
        except BaseException:
            self.dfa.discard_points()  # a failed forward leaves no point behind
            raise
        left = self.dfa.discard_points()
        if left:
            raise RuntimeError(
                f"DFAModel: {left} feedback point(s) were recorded but output_module "
                f"{self.output_module!r} never ran after them, so no DFA output consumed them"
            )
        return result

    def begin_forward(self) -> None:
        """Points pending now were not recorded by this forward: drop them, with a warning. A
        layer-wise mode needs converted layers."""
        if self.dfa.mode in methods.LAYERWISE and not self.layers:
            raise RuntimeError(
                f"mode {self.dfa.mode!r} changes each layer's input gradient, but this model was "
                "converted without layer-wise layers: convert it with a layer-wise mode or with "
                "layers= (e.g. layers=(nn.Linear, nn.Conv2d))"
            )
        stale = self.dfa.discard_points()
        if stale:
            warnings.warn(
                f"DFAModel: discarded {stale} feedback point(s) recorded outside a forward pass (or by a "
                "forward that raised before reaching its output)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.trace.names.clear()

    def _wrap_result(self, result: Any) -> Any:
        if isinstance(result, torch.Tensor):
            return self.dfa_output(result)
        key = _output_key(result, self.output)
        if key is None:
            raise TypeError(
                f"DFAModel: the model returned {type(result).__name__} with no tensor to take as the "
                "DFA output; pass output=KEY (or INDEX), or output_module='NAME'"
            )
        if isinstance(result, Mapping):
            if key not in result:
                raise ValueError(
                    f"DFAModel: output={key!r} is not a key of the model's output; its keys: {list(result.keys())}"
                )
            loss = result.get("loss")
            if (
                isinstance(loss, torch.Tensor)
                and loss.requires_grad
                and self.dfa.mode in methods.DIRECT
                and key != "loss"
            ):
                raise RuntimeError(
                    f"DFAModel: the model computed output['loss'] inside its forward, from output[{key!r}] before "
                    "DFA could wrap it: its backward would bypass DFA. Compute the loss outside the model (e.g. "
                    "call it without labels), convert with output_module='NAME' (the module whose output is the "
                    "DFA output, e.g. the final norm), or use dfa_kernels.huggingface.convert for a Hugging Face LM"
                )
            out = cast(MutableMapping, copy.copy(result))  # outputs are mutable (dict, ModelOutput)
            out[key] = self.dfa_output(result[key])
            return out
        if not isinstance(key, int) or not -len(result) <= key < len(result):  # a tuple or list
            raise ValueError(
                f"DFAModel: output={key!r} is not an index of the model's {len(result)}-item "
                f"{type(result).__name__} output"
            )
        items = list(result)
        items[key] = self.dfa_output(items[key])
        if isinstance(result, list):
            return items
        return type(result)(*items) if hasattr(result, "_fields") else type(result)(items)

    def dfa_output(self, y: torch.Tensor) -> torch.Tensor:
        """``dfa(y)``, after checking, on the first DFA step, that no gradient bypasses the points."""
        self.check_gradient_paths((y,))
        return self.dfa(y)

    def check_gradient_paths(self, roots: tuple[torch.Tensor, ...]) -> None:
        """Warn (once, :class:`HybridGradientWarning`) when the residual stream carries gradients past
        the points; `roots` are the tensors the output error enters the network through."""
        if not self.trace.active or self.dfa.mode not in methods.DIRECT or not torch.is_grad_enabled():
            self.trace.names.clear()
            return
        names = list(self.trace.names)
        self.trace.active = False
        self.trace.names.clear()
        message = hybrid_report(roots, self.dfa.pending_points, self.model, names)
        if message:
            warnings.warn(message, HybridGradientWarning, stacklevel=3)

    def extra_repr(self) -> str:
        shown = ", ".join(self.points[:6]) + (f", ... ({len(self.points)} in all)" if len(self.points) > 6 else "")
        return f"points=[{shown}]" + (f", layers={len(self.layers)}" if self.layers else "")


# ---------------------------------------------------------------- the residual-stream check
def _is_leaf(node: object) -> bool:
    return hasattr(node, "variable")  # AccumulateGrad: a parameter (or an input that requires grad)


def _block_list(model: nn.Module, point_names: list[str]) -> str:
    """The name of the ModuleList/Sequential of blocks holding the first named point (for the
    warning's suggestion), or "blocks"."""
    containers = {n for n, m in model.named_modules() if n and isinstance(m, (nn.ModuleList, nn.Sequential))}
    for name in point_names:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:cut]) in containers:
                return ".".join(parts[:cut])
    return "blocks"


def hybrid_report(
    roots: Iterable[object], records: Sequence[Record], model: nn.Module, point_names: list[str] | None = None
) -> str | None:
    """Whether gradients bypass the feedback points, as a warning message (None if they do not).

    Sources: the output (its error enters at `roots`) and each point (its feedback enters at the
    point's tensor). In faithful DFA, the autograd graphs below the sources are disjoint except at
    parameters (a parameter shared by two points, or tied, legitimately sums two signals). An
    operation node reached from two sources is where a residual stream (or any skip connection)
    carries one source's gradient past another's point; every parameter below such a node learns
    from mixed signals. Runs once, on a graph of a few thousand nodes.
    """
    # autograd nodes, typed Any: torch's stubs lack AccumulateGrad.variable (read below)
    sources: list[list[Any]] = [[t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]]
    sources += [[t.grad_fn for t in r.inputs() if t is not None and t.grad_fn is not None] for r in records]
    reached: dict[Any, int] = {}
    for index, fns in enumerate(sources):
        bit, stack = 1 << index, list(fns)
        while stack:
            node = stack.pop()
            mask = reached.get(node, 0)
            if mask & bit:
                continue
            reached[node] = mask | bit
            stack.extend(n for n, _ in node.next_functions if n is not None)
    shared = [n for n, m in reached.items() if m & (m - 1) and not _is_leaf(n)]
    if not shared:
        return None
    mixed_sources = 0
    for n in shared:
        mixed_sources |= reached[n]
    params, seen, stack = set(), set(), list(shared)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_leaf(node):
            params.add(id(node.variable))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    modules = []
    for name, p in model.named_parameters():
        if id(p) in params:
            owner = name.rpartition(".")[0] or name
            if owner not in modules:
                modules.append(owner)
    names = point_names if point_names and len(point_names) == len(records) else None
    labels = [
        ("the output" if i == 0 else f"point {names[i - 1]!r}" if names else f"point #{i - 1}")
        for i in range(len(sources))
        if mixed_sources >> i & 1
    ]
    shown = ", ".join(modules[:8]) + (f", ... ({len(modules)} modules)" if len(modules) > 8 else "")
    blocks = _block_list(model, [n for i, n in enumerate(names or []) if mixed_sources >> (i + 1) & 1])
    return (
        "DFA: gradients bypass the feedback points through the residual stream (or another skip "
        f"connection): gradients from {', '.join(labels[:6])}{' ...' if len(labels) > 6 else ''} flow "
        "around the points into lower layers, so in mode 'dfa' these modules learn from a mix of backprop "
        f"and DFA signals: {shown or 'no parameter'}. Faithful choices: points on the residual stream after "
        f"every block (points='{blocks}.*', paper 1's macro placement), or points inside the blocks plus "
        "points on the stream at every block boundary (micro; README, 'Residual models'); for Hugging Face "
        "causal LMs, dfa_kernels.huggingface.convert(model, placement='macro' | 'micro' | 'linear'). "
        "convert(..., check_residual=False) skips this check."
    )


# ---------------------------------------------------------------- convert
def _fold_linear_activations(
    model: nn.Module, chosen: dict[int, tuple[str, nn.Module]], dfa: DFA, trace: PointTrace
) -> None:
    """convert(fuse=True): inside an nn.Sequential, a chosen fusable activation directly after an
    nn.Linear becomes part of a DFALinear (the activation becomes nn.Identity)."""
    for _, parent in list(model.named_modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, child), (next_name, following) in zip(children, children[1:]):
            act = _fused_name(following)
            if type(child) is nn.Linear and act and id(following) in chosen and id(child) not in chosen:
                point_name = chosen.pop(id(following))[0]
                setattr(parent, name, DFALinear(child, act, dfa, point_name, trace))
                setattr(parent, next_name, nn.Identity())


def _is_pyg_linear(module: nn.Module) -> bool:
    """PyG's ``Linear`` (``F.linear(x, weight, bias)``, weight [out, in]), looked up only where PyG is
    already imported (a model holding one has imported it)."""
    pyg = sys.modules.get("torch_geometric.nn.dense.linear")
    return pyg is not None and type(module) is pyg.Linear


def _is_layer(name: str, module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d) or _is_pyg_linear(module)


def refuse_fdfa(model: nn.Module, mode: str) -> None:
    """Mode "fdfa" on a transformers model: a clear error (its attention's softmax under forward
    mode breaks the backward in torch; the zoo's TransformerLM writes its softmax out)."""
    if mode == "fdfa" and any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        raise ValueError(
            "mode 'fdfa' runs the forward in forward-mode AD, and a transformers model's attention "
            "softmax there breaks its backward in torch (its saved output is modified in place: "
            "tested with GPT-2, eager and sdpa attention); the zoo's TransformerLM writes its softmax "
            "out and trains in fdfa"
        )


def convert_layers(
    model: nn.Module, dfa: DFA, layers: Selector | None = None, constrain_weights: bool = False
) -> list[str]:
    """Replace the chosen layers of `model` (default: every module of type exactly nn.Linear,
    nn.Conv2d or PyG's Linear; a subclass keeps its own forward unless chosen) by FeedbackLinear/FeedbackConv2d
    sharing their parameters, under the same names, reading `dfa`'s mode. Layer i (in
    ``named_modules`` order) gets the hash seed ``layer_seed(dfa.seed, i)``. Returns their names."""
    chosen = select_modules(model, _is_layer if layers is None else layers, "layers")
    wrapped: dict[int, nn.Module] = {}
    for index, (name, module) in enumerate(chosen):
        if isinstance(module, (FeedbackLinear, FeedbackConv2d)):
            raise ValueError(f"layers: module {name!r} is already a feedback layer (converted twice?)")
        if isinstance(module, nn.Linear) or _is_pyg_linear(module):
            wrapped[id(module)] = FeedbackLinear.from_module(
                module, dfa, layer_seed(dfa.seed, index), constrain_weights
            )
        elif isinstance(module, nn.Conv2d):
            wrapped[id(module)] = FeedbackConv2d.from_module(
                module, dfa, layer_seed(dfa.seed, index), constrain_weights
            )
        else:
            raise TypeError(
                f"layers: module {name!r} is a {type(module).__name__}; layer-wise feedback applies to "
                "nn.Linear, nn.Conv2d and PyG's Linear"
            )
    for parent in list(model.modules()):  # every place a chosen module sits (a shared one: all of them)
        for child_name, child in list(parent.named_children()):
            if id(child) in wrapped:
                setattr(parent, child_name, wrapped[id(child)])
    return [name for name, _ in chosen]


def convert(
    model: nn.Module,
    mode: str = "dfa",
    points: Selector | None = None,
    *,
    after: Sequence[type[nn.Module]] | None = None,
    input_points: Selector | None = None,
    detach: Selector | None = None,
    output: str | int | None = None,
    output_module: str | None = None,
    inplace: bool = False,
    fuse: bool = False,
    check_residual: bool = True,
    layers: Selector | None = None,
    constrain_weights: bool = False,
    **dfa_kwargs: Any,
) -> DFAModel:
    """Insert feedback points into an existing model and wrap its output, without touching its forward.

    points: where the points go, at module outputs (see the module docstring): None (every
      activation module, torch's, transformers' and timm's), module-name globs (``"layers.*"``),
      module types, or a callable ``(name, module) -> bool``. ``after=`` is the older name for
      module types. A module chosen twice in the tree, or called twice per forward, gives a point
      per call.
    input_points: modules whose *input* (first tensor argument) is a point (e.g. the first block,
      so that the embeddings learn from their own point in a "micro" placement).
    detach: modules whose input is detached (cuts a residual stream without a point; not in mode "bp").
    output: for a model returning a tuple/list or a mapping (dict, Hugging Face ModelOutput), the
      index or key of the DFA output (default: "logits" if present, else the first tensor); the
      other items pass through.
    output_module: instead, the name of the module whose output is the DFA output (e.g. the final
      norm of an LM: everything after it, head and loss included, learns by exact gradient).
    check_residual: on the first DFA step, warn (:class:`HybridGradientWarning`, once) when the
      residual stream carries gradients past the points (see the module docstring).
    fuse: inside an ``nn.Sequential``, an ``nn.Linear`` directly followed by a chosen ReLU, GELU
      (exact), Tanh, Sigmoid or SiLU module becomes one :class:`DFALinear` point (the activation
      becomes ``nn.Identity``): activation derivative in the projection, weight gradients grouped.
    layers: the layers that get layer-wise feedback (modes fa, usf, brsf, frsf; see the module
      docstring): globs, nn.Linear/nn.Conv2d types or a callable, as for points. Default: none in
      a direct mode, every nn.Linear and nn.Conv2d in a layer-wise one.
    constrain_weights: the layer-wise layers keep W at its initial norm (Moskovitz et al. 2018).
    inplace: modify `model` itself (default: a deep copy). Other keywords go to :class:`DFA`
      (``threshold`` for "ternary", ``init`` for the layer-wise matrices, ...).

    The converted model's outputs equal the original's, in train and eval mode; parameter names
    are unchanged (``converted.model.state_dict()`` loads into the original and back), and
    ``converted.state_dict()`` adds the DFA's spec.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module; got {type(model).__name__}")
    if after is not None:
        if points is not None:
            raise TypeError("convert: pass points= or its older name after=, not both")
        if (
            not isinstance(after, (list, tuple))
            or not after
            or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in after)
        ):
            raise TypeError(f"after must be a non-empty tuple of nn.Module subclasses; got {after!r}")
        points = tuple(after)
    if output is not None and output_module is not None:
        raise TypeError(
            "convert: pass output= (a key or index of the forward's result) or output_module= (a module name), not both"
        )
    refuse_fdfa(model, mode)
    dfa = DFA(mode=mode, **dfa_kwargs)
    layerwise = layers is not None or mode in methods.LAYERWISE
    if fuse and layerwise:
        raise ValueError(
            "convert: fuse=True folds linear layers into dfa.linear points, which own their backward "
            "and have no layer-wise form; with layer-wise feedback (mode fa/usf/brsf/frsf or layers=) "
            "use fuse=False"
        )
    if constrain_weights and not layerwise:
        raise ValueError(
            "convert: constrain_weights=True applies to layer-wise layers: pass a layer-wise mode or layers="
        )
    model = model if inplace else copy.deepcopy(model)
    converted = DFAModel(model, dfa, output, output_module)
    if layerwise:
        converted.layers = tuple(convert_layers(model, dfa, layers, constrain_weights))
    return attach(converted, points, input_points, detach, fuse, check_residual)


def attach(
    converted: DFAModel,
    points: Selector | None = None,
    input_points: Selector | None = None,
    detach: Selector | None = None,
    fuse: bool = False,
    check_residual: bool = True,
) -> DFAModel:
    """Install the hooks of `convert` on ``converted.model`` (the points of ``converted.dfa``, the
    detached inputs, the output module's hook); returns `converted` with ``points`` filled in."""
    model, dfa, output_module = converted.model, converted.dfa, converted.output_module
    chosen = {id(m): (n, m) for n, m in select_modules(model, points, "points")}
    starts = {id(m): (n, m) for n, m in select_modules(model, input_points, "input_points")} if input_points else {}
    cuts = select_modules(model, detach, "detach") if detach is not None else []
    if not chosen and not starts and not converted.layers:
        what = (
            "activation modules (torch's, transformers', timm's)"
            if points is None
            else f"modules matching points={points!r}"
        )
        raise ValueError(
            f"convert found no {what} in the model: pass points= (module-name globs such as "
            "'layers.*', module types, or a callable (name, module) -> bool) to say where the "
            "feedback points go"
        )
    modules = dict(model.named_modules())
    if output_module is not None and (
        not isinstance(output_module, str) or output_module not in modules or not output_module
    ):
        near = difflib.get_close_matches(str(output_module), list(modules), n=3, cutoff=0.4)
        raise ValueError(
            f"output_module must name a submodule of the model (a key of named_modules()); got "
            f"{output_module!r}" + (f" (close: {near})" if near else "")
        )
    trace = converted.trace = PointTrace(active=check_residual)
    if fuse:
        _fold_linear_activations(model, chosen, dfa, trace)
    names: list[str] = []
    for name, module in starts.values():
        module.register_forward_pre_hook(InputPoint(dfa, f"{name} (input)", trace), with_kwargs=True)
        names.append(f"{name} (input)")
    for name, module in cuts:
        module.register_forward_pre_hook(DetachInput(dfa, name), with_kwargs=True)
    for name, module in chosen.values():
        module.register_forward_hook(FeedbackPoint(dfa, name, trace))
        names.append(name)
    names += [m.point_name for m in model.modules() if isinstance(m, DFALinear)]
    converted.points = tuple(names)
    if output_module is not None:
        modules[output_module].register_forward_hook(OutputHook(converted, output_module))
    return converted
