"""The feedback-alignment family: each layer's input gradient through a matrix in place of W^T.

:class:`FeedbackLinear` and :class:`FeedbackConv2d` are an ``nn.Linear`` / ``nn.Conv2d`` whose
forward, in a layer-wise mode, applies an autograd function (no hooks) whose backward computes

    grad(x) = g @ B          (linear; conv: conv2d_input of g with B as the kernel)
    grad(W) = g^T x,  grad(b) = sum(g)   (exactly backprop's)

with g the layer's output gradient and B, of W's shape, the mode's matrix (update rules in
:mod:`dfa_kernels.methods`):

- ``fa``:   B = c * H, H the hash's matrix [out, in].
- ``usf``:  B = σ * sign(W).
- ``brsf``: B = c * |H_t| ∘ sign(W), H_t drawn from the hash anew at every training forward.
- ``frsf``: B = c * |H| ∘ sign(W), H fixed (fa's).

fa's and frsf's fixed part (c * H, c * |H|) is generated once and kept by the layer under storage
"auto" (while it is at most 64 MiB) or "materialized": W's size again, as biotorch keeps it, but
never in the state_dict (the seed regenerates it). Under "virtual" nothing is kept: fa's ``g @ B``
is the ``project`` op with an [out, in] spec (B generated in tiles inside the kernel), frsf's |H| is
regenerated in each backward. A linear layer applies the scale (c, σ) to its [N, in] input gradient
rather than to B, so each step reads W once (sign) and builds B in place.

``init`` sets the spread: "xavier" (biotorch's default preset) gives σ = sqrt(2 / (fan_in + fan_out)),
the standard deviation of Xavier's init, "kaiming" σ = 1 / sqrt(3 fan_in) (PyTorch's default Linear
init); c = σ / std(distribution), so with the uniform distribution c * H is Xavier-uniform (bound
sqrt(6 / (fan_in + fan_out))), as biotorch draws it. fan_in/fan_out are torch's (a convolution's
include its receptive field). Each layer has its own seed, derived from the DFA's seed and the
layer's index (:func:`layer_seed`); brsf's draws from it and the draw count.

``constrain_weights=True`` (Moskovitz et al. 2018, as biotorch's option): before each forward in a
layer-wise mode, W is rescaled in place to the norm it had when the layer was made.

In any other mode the layers are plain ``nn.Linear``/``nn.Conv2d``, so a model converted by
``dk.convert(model, mode="fa")`` switches live between every method. ``layer.feedback_matrix()`` is
the B of the layer's latest training forward (call it before the optimizer changes W), so a test can
hand the same matrices to another implementation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.common_types import _size_2_t

from . import methods, ops, reference
from .feedback import DISTRIBUTIONS, FeedbackSpec

INITS = ("xavier", "kaiming")
# the standard deviation of the hash's values (uniform: [-1, 1), so c * H has exactly Xavier's bound)
DISTRIBUTION_STD = {"uniform": 1.0 / math.sqrt(3.0), "gaussian": 1.0, "rademacher": 1.0}


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(
            f"init must be one of {', '.join(map(repr, INITS))} (the layer-wise feedback's spread); got {init!r}"
        )
    return init


def init_std(init: str, weight: torch.Tensor) -> float:
    """σ: the standard deviation of W's init, Xavier's or PyTorch's default (kaiming_uniform, a=sqrt(5))."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return math.sqrt(2.0 / (fan_in + fan_out)) if init == "xavier" else 1.0 / math.sqrt(3.0 * fan_in)


def layer_seed(seed: int, index: int, draw: int | None = None) -> int:
    """The hash seed of layer `index` (and of its draw number `draw`, brsf): a 32-bit mix, so the
    layers' matrices are independent."""
    mixed = reference.mix32(
        (seed ^ reference.mix32((index * 0x9E3779B9 + 0x632BE5AB) & reference.MASK32)) & reference.MASK32
    )
    if draw is None:
        return int(mixed)
    return int(
        reference.mix32((mixed ^ reference.mix32((draw * 0x85EBCA6B + 1) & reference.MASK32)) & reference.MASK32)
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one layer's backward uses in place of W^T in one step."""

    mode: str
    seed: int  # the hash seed of this step's H (brsf: this draw's)
    distribution: str
    density: float
    init: str
    storage: str
    backend: str
    # the layer's stored fixed part (fa: c * H, frsf: c * |H|; fp32, W's shape) when its storage keeps
    # one (see FeedbackLayer._stored_matrix); None: generated from the hash in each backward
    stored: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    # a W-sized fp32 buffer of the layer that B is built in (see FeedbackLayer._workspace), or None
    workspace: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)

    def spec(self, weight: torch.Tensor) -> FeedbackSpec:
        """H as a feedback spec: [out, in] (a convolution's in: in_channels / groups * kh * kw)."""
        return FeedbackSpec(
            weight.shape[0], (weight[0].numel(),), self.seed, self.distribution, "independent", self.density
        )

    def random_scale(self, weight: torch.Tensor) -> float:
        """c = σ / std(distribution)."""
        std = math.sqrt(self.density) if self.distribution == "sparse" else DISTRIBUTION_STD[self.distribution]
        return init_std(self.init, weight) / std

    def fixed_part(self, weight: torch.Tensor) -> torch.Tensor:
        """The part of B that does not read W, unscaled: H (fa), |H| (brsf, frsf), fp32, W's shape."""
        H = ops.feedback_matrix(self.spec(weight), device=weight.device, backend=self.backend).view(weight.shape)
        return H if methods.METHODS[self.mode].matrix == "random" else H.abs_()

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(M, s) with B = s * M, M fp32 and W's shape: the scale kept apart, so that a linear layer
        applies it to its [N, in] output instead of to a W-sized matrix (one pass over W fewer). M may
        be the layer's stored matrix: read it, never write it."""
        kind = methods.METHODS[self.mode].matrix
        if kind == "sign_uniform":
            return self.sign(weight), init_std(self.init, weight)
        if self.stored is not None:
            M, s = self.stored, 1.0
        else:
            M, s = self.fixed_part(weight), self.random_scale(weight)
        if kind == "random":
            return M, s
        return self.sign(weight).mul_(M), s  # |R|∘sign(W): sign-concordant

    def sign(self, weight: torch.Tensor) -> torch.Tensor:
        """sign(W), fp32, in the workspace when the layer has one (else a new tensor)."""
        w = weight.detach()
        if self.workspace is None:
            return torch.sign(w).float()
        return torch.sign(w, out=self.workspace) if w.dtype == torch.float32 else self.workspace.copy_(w).sign_()

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The effective B, fp32, shaped like W (possibly the layer's stored matrix: read only)."""
        M, s = self.factors(weight)
        return M if s == 1.0 else M * s

    def linear_input_grad(self, g: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """g [N, out] @ B [out, in]: fa's B, when the layer does not store it, through the projection
        op (generated in tiles, never stored); otherwise a matmul with B's factor M, then the scale."""
        if self.mode == "fa" and self.stored is None:
            return ops.project(
                g, self.spec(weight), self.storage, self.backend, scale=self.random_scale(weight), out_dtype=dtype
            )
        M, s = self.factors(weight)
        out = torch.mm(g, M.to(g.dtype))
        return (out if s == 1.0 else out.mul_(s)).to(dtype)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rule):
        ctx.rule = rule
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.rule.linear_input_grad(g.contiguous(), weight, x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:  # in g's dtype: the forward may have run under autocast
            grad_w = (g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rule, stride, padding, dilation, groups):
        ctx.rule, ctx.conv, ctx.has_bias = rule, (stride, padding, dilation, groups), bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        B = ctx.rule.matrix(weight).to(grad.dtype) if ctx.needs_input_grad[0] else weight.to(grad.dtype)
        # one call, backprop's own kernels: grad(x) is the transposed convolution of g with B (not W),
        # grad(W) and grad(b) do not read the weight's values
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad,
            x.to(grad.dtype),
            B,
            [weight.shape[0]] if ctx.has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            list(ctx.needs_input_grad[:3]),
        )
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            grad_b,
            None,
            None,
            None,
            None,
            None,
        )


class FeedbackSource(Protocol):
    """What a converted layer reads from the DFA module that ``dk.convert`` made (a :class:`dk.DFA`;
    named by its attributes, as nn.py imports this module)."""

    @property
    def mode(self) -> str: ...
    @property
    def distribution(self) -> str: ...
    @property
    def density(self) -> float: ...
    @property
    def init(self) -> str: ...
    @property
    def storage(self) -> str: ...
    @property
    def backend(self) -> str: ...


class FeedbackLayer(nn.Module):
    """What :class:`FeedbackLinear` and :class:`FeedbackConv2d` share: the mode (their own, or read
    live from the DFA module that ``dk.convert`` made), the matrix options, brsf's draw counter and
    the weight-norm constraint. A mixin placed before nn.Linear / nn.Conv2d, which hold the weight."""

    weight: torch.Tensor
    source: FeedbackSource | None
    initial_norm: torch.Tensor  # a buffer, under constrain_weights

    def _init_feedback(
        self,
        mode: str,
        seed: int,
        distribution: str,
        density: float,
        init: str,
        storage: str,
        backend: str,
        constrain_weights: bool,
        source: FeedbackSource | None = None,
    ) -> None:
        if source is None:
            self._check_mode(mode)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(map(repr, DISTRIBUTIONS))}; got {distribution!r}")
        FeedbackSpec(1, (1,), seed, distribution, "independent", density)  # seed and density checked
        ops.resolve_storage(storage, FeedbackSpec(1, (1,)))
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}; got {backend!r}")
        self.__dict__["source"] = source  # a reference, not a submodule
        self._mode = mode
        self.seed, self.distribution, self.density = seed, distribution, density
        self.init, self.storage, self.backend = check_init(init), storage, backend
        self.draws = 0  # brsf: matrices drawn so far, one per training forward
        self.constrain_weights = bool(constrain_weights)
        self._constrained_version: int | None = None
        if self.constrain_weights:  # not in the state_dict: the parameter names stay the original model's
            self.register_buffer(
                "initial_norm", torch.linalg.vector_norm(self.weight.detach()).float(), persistent=False
            )

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in methods.LAYERWISE + ("bp",):
            raise ValueError(
                f"mode must be one of {', '.join(map(repr, methods.LAYERWISE + ('bp',)))} for a "
                f"feedback layer; got {mode!r}"
            )

    @property
    def mode(self) -> str:
        return self.source.mode if self.source is not None else self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if self.source is not None:
            raise AttributeError(
                "this layer reads its mode from the DFA module of its converted model: set converted.dfa.mode"
            )
        self._check_mode(value)
        self._mode = value

    def _rule(self, mode: str, draw: int) -> Rule:
        seed = layer_seed(self.seed, 0, draw) if mode == "brsf" else self.seed
        constants = (mode, seed, self.distribution, self.density, self.init, self.storage, self.backend)
        rule = Rule(*constants)
        stored, workspace = self._stored_matrix(rule), self._workspace(mode)
        # a second construction, not dataclasses.replace: this runs at every forward (~4x cheaper)
        return rule if stored is None and workspace is None else Rule(*constants, stored, workspace)

    def _workspace(self, mode: str) -> torch.Tensor | None:
        """A W-sized fp32 buffer, kept by the layer, that usf's, brsf's and frsf's B (read W, so made
        anew each step) is built in: on the CPU a fresh W-sized tensor per step costs page faults on
        the order of the GEMM itself. Not under storage "virtual" (nothing W-sized is kept), nor on a
        GPU (its caching allocator reuses memory already). The backward consumes B before it returns,
        so one buffer serves every call of the layer."""
        if mode not in ("usf", "brsf", "frsf") or self.storage == "virtual" or self.weight.device.type != "cpu":
            return None
        buffer = self.__dict__.get("_b_workspace")
        if buffer is None or buffer.shape != self.weight.shape:
            buffer = self.__dict__["_b_workspace"] = torch.empty(self.weight.shape, dtype=torch.float32)
        return buffer

    def _stores(self, mode: str) -> bool:
        """Whether this layer keeps its fixed matrix: fa's and frsf's B do not change, so under
        storage "materialized", or "auto" while B is at most 64 MiB (fp32), it is generated once per
        device and kept (W's size again, as biotorch keeps it; never in the state_dict: the seed
        regenerates it); "virtual" keeps nothing (fa through the projection op, frsf regenerated
        in every backward)."""
        if mode not in ("fa", "frsf") or self.storage == "virtual":
            return False
        return self.storage == "materialized" or self.weight.numel() * 4 <= ops.MATERIALIZE_LIMIT_BYTES

    def _stored_matrix(self, rule: Rule) -> torch.Tensor | None:
        """The stored c * H (fa) or c * |H| (frsf), made on first use (one per layer: a mode or
        device change replaces it)."""
        if not self._stores(rule.mode):
            return None
        key = (rule.mode, rule.seed, rule.distribution, rule.density, rule.init, self.weight.device, self.weight.shape)
        cached = self.__dict__.get("_stored")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                stored = rule.fixed_part(self.weight).mul_(rule.random_scale(self.weight))
            self.__dict__["_stored"] = cached = (key, stored)
        return cached[1]

    def _feedback_rule(self) -> Rule | None:
        """The rule of this training forward (None: a plain layer now). Rescales W first under
        constrain_weights, and advances brsf's draw."""
        mode = self.mode
        if mode not in methods.LAYERWISE:
            return None
        if self.constrain_weights and self.weight._version != self._constrained_version:
            with torch.no_grad():  # once per change of W (a layer called twice keeps its saved W intact)
                self.weight.mul_(
                    (self.initial_norm / torch.linalg.vector_norm(self.weight.float())).to(self.weight.dtype)
                )
            self._constrained_version = self.weight._version
        if not torch.is_grad_enabled():
            return None
        if mode == "brsf":
            self.draws += 1
        return self._rule(mode, self.draws - 1)

    def feedback_matrix(self) -> torch.Tensor:
        """B [W's shape, fp32] of the latest training forward (brsf: its draw), from the current W."""
        mode = self.mode
        if mode not in methods.LAYERWISE:
            raise RuntimeError(f"mode {mode!r} uses no layer-wise feedback matrix (modes: {methods.LAYERWISE})")
        with torch.no_grad():
            return self._rule(mode, max(self.draws - 1, 0)).matrix(self.weight).clone()

    def _feedback_repr(self) -> str:
        return f"mode={self.mode!r}, seed={self.seed}, init={self.init!r}" + (
            ", constrain_weights=True" if self.constrain_weights else ""
        )


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` whose input gradient, in modes fa/usf/brsf/frsf, is ``g @ B`` (see the module doc)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "fa",
        seed: int = 0,
        *,
        distribution: str = "uniform",
        density: float = 0.1,
        init: str = "xavier",
        storage: str = "auto",
        backend: str = "auto",
        constrain_weights: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_feedback(mode, seed, distribution, density, init, storage, backend, constrain_weights)

    @classmethod
    def from_module(
        cls, linear: nn.Module, source: FeedbackSource, seed: int, constrain_weights: bool = False
    ) -> FeedbackLinear:
        """A FeedbackLinear sharing `linear`'s parameters (same names), its mode and options `source`'s
        (a :class:`dk.DFA`). `linear`: an ``nn.Linear`` or any module computing ``F.linear(x, weight,
        bias)`` with ``weight`` [out, in] and ``bias`` [out] or None (PyG's ``Linear``)."""
        # typed as nn.Linear types them (its bias may be None all the same)
        weight, bias = cast(nn.Parameter, linear.weight), cast(nn.Parameter, linear.bias)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"layers: {type(linear).__name__} has a lazy (uninitialized) weight: give it its input size, "
                "or run one forward before converting"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.weight, layer.bias = weight, bias
        layer._init_feedback(
            source.mode,
            seed,
            source.distribution,
            source.density,
            source.init,
            source.storage,
            source.backend,
            constrain_weights,
            source,
        )
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rule = self._feedback_rule()
        if rule is None:
            return F.linear(x, self.weight, self.bias)
        return _LinearFunction.apply(x, self.weight, self.bias, rule)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._feedback_repr()}"


class FeedbackConv2d(FeedbackLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input gradient, in modes fa/usf/brsf/frsf, is ``conv2d_input`` with B
    (see the module doc)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        mode: str = "fa",
        seed: int = 0,
        *,
        distribution: str = "uniform",
        density: float = 0.1,
        init: str = "xavier",
        storage: str = "auto",
        backend: str = "auto",
        constrain_weights: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_feedback(mode, seed, distribution, density, init, storage, backend, constrain_weights)

    @classmethod
    def from_module(
        cls, conv: nn.Conv2d, source: FeedbackSource, seed: int, constrain_weights: bool = False
    ) -> FeedbackConv2d:
        """A FeedbackConv2d sharing `conv`'s parameters and settings, its mode and options `source`'s."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for name in nn.Conv2d.__constants__ + ["transposed", "_reversed_padding_repeated_twice"]:
            setattr(layer, name, getattr(conv, name))
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._init_feedback(
            source.mode,
            seed,
            source.distribution,
            source.density,
            source.init,
            source.storage,
            source.backend,
            constrain_weights,
            source,
        )
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rule = self._feedback_rule()
        if rule is None:
            return self._conv_forward(x, self.weight, self.bias)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            # padding as its own (differentiable) op, so the function sees integer paddings: padding
            # modes, and 'same' with an even kernel (uneven sides) as nn.Conv2d pads it
            if self.padding_mode != "zeros":
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            elif self.padding == "same":
                x = F.pad(x, self._reversed_padding_repeated_twice)
            padding: tuple[int, ...] = (0, 0)
        else:
            padding = self.padding
        return _Conv2dFunction.apply(x, self.weight, self.bias, rule, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._feedback_repr()}"
