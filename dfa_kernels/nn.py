"""DFA training without backprop: feedback points, the DFA output op, model conversion.

In a model's forward, ``h = dfa.point(h)`` records a hidden tensor and hands ``h.detach()`` to
the next layer, so no gradient (and no input-gradient GEMM) flows between points; ``y = dfa(y)``
wraps the output in one autograd op whose backward takes the error ``e = dL/dy``, launches one
projection ``F = e @ B`` and returns each point its slice of ``F`` as the point's gradient. The
autograd engine then computes every layer's weight gradient from those slices, in the same pass.

Two fused forms do more of the backward inside that one op:
- ``h = dfa.point(a, activation="relu")`` records the pre-activation: the projection applies
  relu'(a) in its epilogue, so the point's gradient (w.r.t. ``a``) comes out of one kernel.
- ``h = dfa.linear(x, layer, activation="relu")`` also owns the layer: the backward computes the
  weight gradients of every such layer in one grouped launch (none depends on another).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from .feedback import DISTRIBUTIONS, LAYOUTS, FeedbackSpec

MODES = ("dfa", "bp", "shallow")
# Module types after which `convert` inserts a feedback point by default.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
               nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
               nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.GLU)


ACTIVATION_NAMES = ops.ACTIVATIONS[1:]  # what dfa.point(..., activation=) and dfa.linear accept


@dataclasses.dataclass
class _Record:
    """One feedback point of a forward pass. `tensor` gets the point's gradient: h itself, or the
    pre-activation a for a fused point. Linear points also hold the layer's input and parameters."""
    tensor: torch.Tensor
    activation: str = "none"
    layer_input: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def inputs(self) -> list[torch.Tensor]:
        """The tensors the DFA output op takes for this point (their order is the plan's)."""
        if self.weight is None:
            return [self.tensor]
        return [self.tensor, self.layer_input, self.weight] + ([] if self.bias is None else [self.bias])


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one backward needs: constants only, so torch.compile can trace it. `kinds[l]` is
    "point" or "linear", or "linear+bias"; `activations[l]` is "none" for a plain point."""
    spec: FeedbackSpec
    scales: tuple[float, ...]
    storage: str
    backend: str
    check_finite: bool
    kinds: tuple[str, ...]
    activations: tuple[str, ...]
    error_dtype: torch.dtype | None = None  # the dtype e is projected in (None: e's own)

    @property
    def fused(self) -> bool:
        return any(a != "none" for a in self.activations) or any(k != "point" for k in self.kinds)


class _DFAOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, plan, *tensors):
        ctx.plan = plan
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtypes = [t.dtype for t in tensors]
        if plan.fused:  # the pre-activations and the linear layers' inputs and weights
            ctx.save_for_backward(*tensors)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        plan = ctx.plan
        spec = plan.spec
        e = grad_y.reshape(-1, spec.out_features).contiguous()
        if plan.check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(e).all()):
            raise FloatingPointError(
                "DFA: the output error e = dL/dy contains NaN or Inf; no feedback was sent and no "
                "hidden layer received a gradient this step (check the loss; DFA(check_finite=False) "
                "skips this check)")
        if plan.error_dtype is not None:
            e = e.to(plan.error_dtype)
        if plan.fused:
            return (grad_y, None, *_fused_backward(ctx, e))
        out_dtype = _common_dtype(ctx.dtypes)  # written by the projection: no cast pass after it
        if len(set(plan.scales)) == 1:
            F = ops.project(e, spec, plan.storage, plan.backend, scale=plan.scales[0], out_dtype=out_dtype)
        else:
            F = ops.project(e, spec, plan.storage, plan.backend, col_scale=_col_scale(plan, e.device),
                            out_dtype=out_dtype)
        grads = [F[:, off:off + w].reshape(shape).to(dtype)
                 for off, w, shape, dtype in zip(spec.offsets, spec.widths, ctx.shapes, ctx.dtypes)]
        return (grad_y, None, *grads)


def _common_dtype(dtypes) -> torch.dtype | None:
    """The points' dtype when they share one (the projection's output dtype), else None."""
    dtypes = set(dtypes)
    return dtypes.pop() if len(dtypes) == 1 else None


def _starts(plan: _Plan) -> list[int]:
    """Index of each point's first tensor among the op's inputs (see _Record.inputs)."""
    starts, i = [], 0
    for kind in plan.kinds:
        starts.append(i)
        i += {"point": 1, "linear": 3, "linear+bias": 4}[kind]
    return starts


def _act_inputs(plan: _Plan, tensors, N: int) -> list:
    """The pre-activations [N, d_l] the fused epilogue reads (None for plain points)."""
    return [None if act == "none" else tensors[s].reshape(N, w)
            for s, act, w in zip(_starts(plan), plan.activations, plan.spec.widths)]


def _fused_backward(ctx, e: torch.Tensor) -> list:
    """Gradients of every input tensor of the op: one project_points launch (activation
    derivatives in its epilogue), then one grouped weight-gradient launch for the linear points."""
    plan, tensors = ctx.plan, ctx.saved_tensors
    out_dtype = _common_dtype(ctx.dtypes[s] for s in _starts(plan))  # the points' (pre-activations') dtype
    outs = ops.project_points(e, plan.spec, plan.storage, plan.backend, scales=plan.scales,
                              act_inputs=_act_inputs(plan, tensors, e.shape[0]), activations=list(plan.activations),
                              out_dtype=out_dtype)
    return _input_grads(plan, tensors, ctx.shapes, ctx.dtypes, ctx.needs_input_grad[2:], outs)


def _input_grads(plan: _Plan, tensors, shapes, dtypes, needs_grad, outs) -> list:
    """The gradients of the points' input tensors from each point's delta outs[l] [N, d_l]."""
    N = outs[0].shape[0]
    starts = _starts(plan)
    grads: list = [None] * len(tensors)
    linear = [(l, s) for l, (s, kind) in enumerate(zip(starts, plan.kinds)) if kind != "point"]
    for l, (s, kind) in enumerate(zip(starts, plan.kinds)):
        if kind == "point":
            grads[s] = outs[l].reshape(shapes[s]).to(dtypes[s])
    if linear:
        deltas, xs = [], []
        for l, s in linear:
            x = tensors[s + 1]
            deltas.append(outs[l].to(x.dtype))
            xs.append(x.reshape(N, -1))
        weight_dtype = tensors[linear[0][1] + 2].dtype
        weight_grads = ops.grouped_weight_grad(deltas, xs, plan.backend, out_dtype=weight_dtype)
        for (l, s), delta, grad_w in zip(linear, deltas, weight_grads):
            x, w = tensors[s + 1], tensors[s + 2]
            grads[s + 2] = grad_w.to(w.dtype)
            if plan.kinds[l] == "linear+bias":
                grads[s + 3] = delta.sum(0, dtype=torch.float32).to(tensors[s + 3].dtype)
            if needs_grad[s + 1]:  # the layer's input comes from a trained layer (embeddings)
                grads[s + 1] = (delta @ w.to(delta.dtype)).reshape(shapes[s + 1]).to(x.dtype)
    return grads


class _DFALinearCrossEntropy(torch.autograd.Function):
    """Loss = cross_entropy(hidden @ W^T + b, target), never holding [N, vocab]: for each row chunk
    the logit gradient e_c (the DFA error) is projected to every point's rows at once, so the whole
    backward is done in forward (like fused linear-cross-entropy kernels) and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, plan, ignore_index, *tensors):
        from . import lm_head

        N = hidden.shape[0]
        act_inputs = _act_inputs(plan, tensors, N)
        out_dtype = _common_dtype(tensors[s].dtype for s in _starts(plan)) or torch.float32
        outs = [torch.empty(N, w, dtype=out_dtype, device=hidden.device) for w in plan.spec.widths]

        def project_chunk(start, stop, e_chunk):
            rows = [None if a is None else a[start:stop] for a in act_inputs]
            if plan.error_dtype is not None:
                e_chunk = e_chunk.to(plan.error_dtype)
            chunk = ops.project_points(e_chunk, plan.spec, plan.storage, plan.backend, scales=plan.scales,
                                       act_inputs=rows, activations=list(plan.activations), out_dtype=out_dtype)
            for out, c in zip(outs, chunk):
                out[start:stop] = c

        loss, grad_hidden, grad_weight, grad_bias = lm_head.chunked_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=ignore_index, on_chunk=project_chunk, backend=plan.backend)
        if plan.check_finite and not bool(torch.isfinite(loss)):
            raise FloatingPointError("DFA: the loss is NaN or Inf; no feedback will be sent this step "
                                     "(DFA(check_finite=False) skips this check)")
        ctx.plan, ctx.has_bias = plan, bias is not None
        ctx.shapes, ctx.dtypes = [t.shape for t in tensors], [t.dtype for t in tensors]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, *tensors, *outs)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias, *rest = ctx.saved_tensors
        count = len(ctx.shapes)
        tensors, outs = rest[:count], rest[count:]
        grads = _input_grads(ctx.plan, tensors, ctx.shapes, ctx.dtypes, ctx.needs_input_grad[6:],
                             [o * grad_loss for o in outs])
        return (grad_hidden * grad_loss, grad_weight * grad_loss,
                grad_bias * grad_loss if ctx.has_bias else None, None, None, None, *grads)


def _check_activation(activation) -> None:
    if activation not in ACTIVATION_NAMES:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATION_NAMES))} (or None); "
                         f"got {activation!r}")


_COL_SCALES: dict = {}


def _col_scale(plan: _Plan, device) -> torch.Tensor:
    """[D] per-column multipliers (independent layout, one scale per point), cached per device."""
    def build():  # from Python constants: static shapes under torch.compile
        per_column = [s for s, w in zip(plan.scales, plan.spec.widths) for _ in range(w)]
        return torch.tensor(per_column, dtype=torch.float32, device=device)
    if torch.compiler.is_compiling():
        return build()
    key = (plan.scales, plan.spec.widths, str(device))
    if key not in _COL_SCALES:
        _COL_SCALES[key] = build()
    return _COL_SCALES[key]


class DFA(nn.Module):
    """Direct Feedback Alignment for one network: ``h = dfa.point(h)`` in forward, ``y = dfa(y)`` at the end.

    mode: "dfa" (points learn from e @ B_l), "bp" (exact gradients through the same model, for
      baselines and alignment) or "shallow" (only layers after the last point learn). Settable live.
    seed, distribution, layout, density: the feedback matrix (see :class:`FeedbackSpec`).
    scale: "auto" (1/sqrt(d_l) per point, or 1/sqrt(max d) in the shared layout) or a number.
    storage: "virtual" | "materialized" | "auto";  backend: "auto" | "cpu" | "cuda" | "triton" | "torch".
    batch_dims: leading dims of y that index rows of the error (default: all but y's last); every
      point must start with the same dims; its width is the product of the rest.
    check_finite: raise FloatingPointError when the error holds NaN/Inf (skipped under torch.compile).
    error_dtype: the dtype the error e is projected in. "auto": bfloat16 when the forward ran under
      bf16 autocast (e is then fp32, as the final layers run in fp32, but the points are bf16: a
      16-bit projection runs on tensor cores and writes bf16 directly), else e's own dtype.
      None: always e's own dtype. Or torch.float32 / float16 / bfloat16 (float16 needs a loss
      scaler, as for BP: an unscaled error underflows).

    The widths of the points are fixed by the first forward pass; the spec (not B) is saved in
    ``state_dict``.
    """

    def __init__(self, mode: str = "dfa", seed: int = 0, distribution: str = "uniform",
                 layout: str = "independent", scale="auto", storage: str = "auto", backend: str = "auto",
                 density: float = 0.1, batch_dims: int | None = None, check_finite: bool = True,
                 error_dtype="auto"):
        super().__init__()
        self.mode = mode
        # validate the matrix options now rather than at the first forward
        FeedbackSpec(1, (1,), seed, distribution, layout, density).scales(scale)
        ops.resolve_storage(storage, FeedbackSpec(1, (1,)))
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}; got {backend!r}")
        if batch_dims is not None and (not isinstance(batch_dims, int) or batch_dims < 1):
            raise ValueError(f"batch_dims must be None or a positive int; got {batch_dims!r}")
        self.seed, self.distribution, self.layout, self.density = seed, distribution, layout, density
        self.scale, self.storage, self.backend = scale, storage, backend
        if not (error_dtype is None or error_dtype == "auto" or error_dtype in ops.FLOAT_DTYPES):
            raise ValueError(f"error_dtype must be 'auto', None or one of torch.float32, torch.float16, "
                             f"torch.bfloat16; got {error_dtype!r}")
        self.batch_dims, self.check_finite, self.error_dtype = batch_dims, check_finite, error_dtype
        self.spec: FeedbackSpec | None = None
        self._points: list[_Record] = []

    @classmethod
    def tinydfa(cls, mode: str = "dfa", seed: int = 0, **kwargs) -> "DFA":
        """TinyDFA's semantics: one shared uniform [-1, 1) matrix, the output flattened per sample,
        point l reads the first d_l columns, everything divided by sqrt(max d_l)."""
        return cls(mode=mode, seed=seed, distribution="uniform", layout="shared", scale="auto",
                   batch_dims=1, **kwargs)

    # ------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {value!r}")
        self._mode = value

    # ------------------------------------------------------------ forward
    def point(self, h: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """Record a feedback point; returns h (mode "bp") or h.detach() (modes "dfa", "shallow").

        With ``activation`` ("relu", "gelu", "tanh", "sigmoid", "silu"), `h` is the pre-activation
        a and the point is f(a): returns f(a) (detached outside mode "bp"), and in mode "dfa" the
        projection applies f'(a) itself (fused epilogue), so a's gradient comes out of one kernel.
        """
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"dfa.point(h) expects a torch.Tensor; got {type(h).__name__}")
        if activation is None:
            self._points.append(_Record(h))
            return h if self._mode == "bp" else h.detach()
        _check_activation(activation)
        self._points.append(_Record(h, activation))
        out = reference.activation(h, activation)
        return out if self._mode == "bp" else out.detach()

    def linear(self, x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
        """``f(layer(x))`` as a feedback point whose layer is trained inside the DFA backward.

        The layer is used through ``layer.weight`` and ``layer.bias`` (``F.linear``).

        In mode "dfa" the layer runs without an autograd graph; the backward of ``dfa(y)`` computes
        delta = (e @ B_l) * f'(a) for every point in one launch, then the weight gradients
        delta^T x of every linear point in one grouped launch, and the bias gradients. x gets the
        gradient delta @ W only when it requires one (e.g. x comes from an embedding). In mode "bp"
        this is exactly ``f(layer(x))``.
        """
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"dfa.linear(x, layer) expects layer to be an nn.Linear; got {type(layer).__name__}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"dfa.linear(x, layer) expects x to be a torch.Tensor; got {type(x).__name__}")
        activation = "none" if activation is None else activation
        if activation != "none":
            _check_activation(activation)
        if self._mode == "bp" or not torch.is_grad_enabled():
            a = F.linear(x, layer.weight, layer.bias)
            self._points.append(_Record(a, activation))
            return a if activation == "none" else reference.activation(a, activation)
        with torch.no_grad():
            a = F.linear(x, layer.weight, layer.bias)
            out = a if activation == "none" else reference.activation(a, activation)
        if self._mode == "dfa":
            self._points.append(_Record(a, activation, x, layer.weight, layer.bias))
        else:  # shallow: the layer does not learn
            self._points.append(_Record(a, activation))
        return out

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        points, self._points = self._points, []
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"dfa(y) expects the output tensor; got {type(y).__name__}")
        if not points:
            raise RuntimeError("dfa(y) was called with no feedback point recorded: call h = dfa.point(h) "
                               "on hidden tensors during the same forward pass")
        spec = self._spec_for(y, [r.tensor for r in points])
        if self._mode != "dfa" or not torch.is_grad_enabled():
            return y
        return _DFAOutput.apply(y, self._plan(spec, points, y.device.type), *[t for r in points for t in r.inputs()])

    def linear_cross_entropy(self, hidden: torch.Tensor, head: nn.Linear, target: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
        """``F.cross_entropy(head(hidden), target)`` as the DFA output, without the [N, vocab] logits.

        Replaces ``dfa(head(hidden))`` + the loss when the error is taken after the vocabulary
        head: row chunk by row chunk, the logits, the loss, its gradient e (the DFA error) and
        e's projection to every point are computed and the chunk is dropped; the head and
        `hidden` get their exact gradients. hidden: [*batch, d]; target: [*batch] class indices.
        """
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear; got {type(head).__name__}")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.shape[-1] != head.in_features:
            raise ValueError(f"hidden must have shape [*batch, head.in_features={head.in_features}]; got "
                             f"{tuple(getattr(hidden, 'shape', ()))}")
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])} (hidden's batch dims); got "
                             f"{tuple(getattr(target, 'shape', ()))}")
        from . import lm_head

        points, self._points = self._points, []
        if not points:
            raise RuntimeError("dfa.linear_cross_entropy was called with no feedback point recorded")
        logits_shape = torch.empty(*hidden.shape[:-1], head.out_features, device="meta")
        spec = self._spec_for(logits_shape, [r.tensor for r in points])
        h2, t1 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        if self._mode != "dfa" or not torch.is_grad_enabled():
            return lm_head.linear_cross_entropy(h2, head.weight, t1, head.bias, ignore_index=ignore_index,
                                                backend=self.backend)
        plan = self._plan(spec, points, hidden.device.type)
        return _DFALinearCrossEntropy.apply(h2, head.weight, head.bias, t1, plan, ignore_index,
                                            *[t for r in points for t in r.inputs()])

    def _plan(self, spec: FeedbackSpec, points: list[_Record], device_type: str) -> _Plan:
        kinds = tuple("point" if r.weight is None else ("linear" if r.bias is None else "linear+bias")
                      for r in points)
        return _Plan(spec, tuple(spec.scales(self.scale)), self.storage, self.backend, self.check_finite,
                     kinds, tuple(r.activation for r in points), self._error_dtype(device_type))

    def _error_dtype(self, device_type: str) -> torch.dtype | None:
        if self.error_dtype != "auto":
            return self.error_dtype
        under_bf16 = (torch.is_autocast_enabled(device_type)
                      and torch.get_autocast_dtype(device_type) == torch.bfloat16)
        return torch.bfloat16 if under_bf16 else None

    def _batch_dims(self, y: torch.Tensor) -> int:
        if self.batch_dims is not None:
            if y.dim() <= self.batch_dims:
                raise ValueError(f"dfa(y): y of shape {tuple(y.shape)} has no feature dim after "
                                 f"batch_dims={self.batch_dims}")
            return self.batch_dims
        if y.dim() < 2:
            raise ValueError(f"dfa(y) expects y of shape [*batch, out_features] (at least 2-D); got "
                             f"{tuple(y.shape)} (use y.unsqueeze(-1) for one output per row)")
        return y.dim() - 1

    def _spec_for(self, y: torch.Tensor, points: list[torch.Tensor]) -> FeedbackSpec:
        nb = self._batch_dims(y)
        batch = tuple(y.shape[:nb])
        out_features = math.prod(y.shape[nb:])
        widths = []
        for index, p in enumerate(points):
            if tuple(p.shape[:nb]) != batch or p.dim() == nb:
                raise ValueError(
                    f"feedback point #{index} has shape {tuple(p.shape)}, but the output y has batch dims "
                    f"{batch} (y: {tuple(y.shape)}): a point must start with the output's batch dims and "
                    f"have at least one more (its width); points with other row counts are not supported")
            widths.append(math.prod(p.shape[nb:]))
        if self.spec is None:
            self.spec = FeedbackSpec(out_features, tuple(widths), self.seed, self.distribution, self.layout,
                                     self.density)
        elif self.spec.widths != tuple(widths) or self.spec.out_features != out_features:
            raise ValueError(
                f"this DFA was built for out_features={self.spec.out_features} and point widths "
                f"{list(self.spec.widths)}, but this forward pass has out_features={out_features} and widths "
                f"{widths}: the feedback matrix is fixed after the first step (call dfa.reset() to rebuild it)")
        return self.spec

    # ------------------------------------------------------------ inspection and state
    def reset(self) -> None:
        """Forget the widths (the next forward pass fixes them again)."""
        self.spec, self._points = None, []

    def resolved_backend(self, device) -> str:
        """The projection backend this module runs on `device` (what 'auto' picks)."""
        if self.spec is None:
            return ops.resolve_backend(self.backend, device)
        storage = ops.resolve_storage(self.storage, self.spec)
        return ops.resolve_backend(self.backend, device, "project", storage, self.spec.out_features)

    def feedback_matrices(self, dtype: torch.dtype = torch.float32, device="cpu") -> list[torch.Tensor]:
        """Effective [out_features, d_l] matrix of each point, scale applied, in point order."""
        if self.spec is None:
            raise RuntimeError("feedback_matrices() needs the point widths: run one forward pass first")
        B = self.spec.matrix(torch.float32, device)
        return [(B[:, off:off + w] * s).to(dtype)
                for off, w, s in zip(self.spec.offsets, self.spec.widths, self.spec.scales(self.scale))]

    def get_extra_state(self) -> dict:
        return {"spec": None if self.spec is None else self.spec.state(), "scale": self.scale,
                "batch_dims": self.batch_dims}

    def set_extra_state(self, state: dict) -> None:
        self.spec = None if state["spec"] is None else FeedbackSpec.from_state(state["spec"])
        self.scale, self.batch_dims = state["scale"], state["batch_dims"]
        if self.spec is not None:
            self.seed, self.distribution = self.spec.seed, self.spec.distribution
            self.layout, self.density = self.spec.layout, self.spec.density

    def extra_repr(self) -> str:
        return (f"mode={self._mode!r}, seed={self.seed}, distribution={self.distribution!r}, "
                f"layout={self.layout!r}, scale={self.scale!r}, storage={self.storage!r}, "
                f"backend={self.backend!r}, error_dtype={self.error_dtype!r}, widths={None if self.spec is None else list(self.spec.widths)}")


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
