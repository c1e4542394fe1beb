"""Drop-in DFA for an existing model: feedback points inserted without touching its forward."""
from __future__ import annotations

import copy

from torch import nn

from .nn import DFA

# Module types after which `convert` inserts a feedback point by default.
# Module types after which `convert` inserts a feedback point by default.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
               nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.GLU)



class FeedbackPoint(nn.Module):
    """Runs `module`, then records its output as a feedback point of `dfa` (added by `convert`)."""

    def __init__(self, module: nn.Module, dfa: DFA):
        super().__init__()
        self.module = module
        self.__dict__["dfa"] = dfa  # a reference, not a submodule: the DFA's state is saved once

    def forward(self, *args, **kwargs):
        return self.dfa.point(self.module(*args, **kwargs))


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

    def __init__(self, linear: nn.Linear, activation: str, dfa: DFA):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.activation = activation
        self.__dict__["dfa"] = dfa  # a reference, not a submodule

    def forward(self, x):
        return self.dfa.linear(x, self, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class DFAModel(nn.Module):
    """A converted model: runs `model` and wraps its output with `dfa`."""

    def __init__(self, model: nn.Module, dfa: DFA):
        super().__init__()
        self.model = model
        self.dfa = dfa

    def forward(self, *args, **kwargs):
        return self.dfa(self.model(*args, **kwargs))


def convert(model: nn.Module, mode: str = "dfa", after: tuple[type, ...] | None = None,
            inplace: bool = False, fuse: bool = False, **dfa_kwargs) -> DFAModel:
    """Insert feedback points into an existing model and wrap its output, without touching forward.

    A point goes after every module whose type is in `after` (default: the activation modules in
    ``ACTIVATIONS``). Functional activations (``F.relu`` in forward) are invisible here: name the
    module types to use instead. The returned model's forward output equals the original's;
    ``converted.dfa`` is the :class:`DFA` (switch ``converted.dfa.mode`` live).

    ``fuse=True``: inside an ``nn.Sequential``, an ``nn.Linear`` directly followed by a ReLU, GELU
    (exact), Tanh, Sigmoid or SiLU module becomes one :class:`DFALinear` point (the activation
    becomes ``nn.Identity``): activation derivative in the projection, weight gradients grouped.
    Parameter names are unchanged, so state dicts load either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module; got {type(model).__name__}")
    after = ACTIVATIONS if after is None else tuple(after)
    if not after or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in after):
        raise TypeError(f"after must be a non-empty tuple of nn.Module subclasses; got {after!r}")
    model = model if inplace else copy.deepcopy(model)
    dfa = DFA(mode=mode, **dfa_kwargs)
    wrapped = 0

    def visit(parent: nn.Module) -> None:
        nonlocal wrapped
        children = list(parent.named_children())
        skip = False
        for (name, child), (next_name, following) in zip(children, children[1:] + [(None, None)]):
            if skip:  # the activation just folded into the DFALinear before it
                skip = False
                continue
            fused = _fused_name(following) if following is not None else None
            if fuse and isinstance(parent, nn.Sequential) and type(child) is nn.Linear and fused \
                    and isinstance(following, after):
                setattr(parent, name, DFALinear(child, fused, dfa))
                setattr(parent, next_name, nn.Identity())
                wrapped += 1
                skip = True
            elif isinstance(child, after):
                setattr(parent, name, FeedbackPoint(child, dfa))
                wrapped += 1
            else:
                visit(child)

    visit(model)
    if wrapped == 0:
        raise ValueError(f"convert found no module of types {[t.__name__ for t in after]} in the model: "
                         "pass after=(ModuleType, ...) naming the modules to put feedback points after")
    return DFAModel(model, dfa)

