"""The autograd functions behind ``dfa(y)`` and ``dfa.linear_cross_entropy``: one backward for all points.

``DFAOutput`` is the identity on the output y; its backward takes the error ``e = dL/dy``,
turns it into the method's signal (e itself, sign(e), ternary e, or the class target: see
:mod:`dfa_kernels.methods`), launches one projection ``F = signal @ B`` (or, for fused points or a
learned B, one ``project_points`` launch with the activation derivatives in its epilogue and one
grouped weight-gradient launch) and returns each point's slice as that point's gradient. The
autograd engine then computes every layer's weight gradients from those slices in the same pass:
no hooks, no re-entrant ``.backward()``.
``DFALinearCrossEntropy`` does the same with the error taken after a vocabulary head, chunk by
chunk, without the [N, vocab] logits. A :class:`Plan` holds what a backward needs, as constants.
"""

from __future__ import annotations

import dataclasses

import torch

from . import methods, ops, reference
from .feedback import FeedbackSpec


class NonFiniteMonitor:
    """The non-finite check of a DFA module, without a host-device synchronisation.

    A backward whose error holds NaN or Inf sends no feedback: every gradient that flows from the
    DFA output is zeroed on the device (``torch.where``, the same kernels whatever the values),
    so no parameter moves from that step, and a counter on the device goes up by one. The counter
    is copied to host memory asynchronously after each backward; the module's next forward reads
    that copy (no wait: on a GPU it may lag by the steps still queued) and raises
    FloatingPointError when it has grown. ``count()`` reads the device counter itself (one sync).
    """

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None  # int32 [1] on the device of the last error
        self._host: torch.Tensor | None = None  # its asynchronous copy in (pinned) host memory
        self._reported = 0

    def record(self, finite: torch.Tensor) -> None:
        """Count one more non-finite step on the device when `finite` (a 0-dim bool tensor) is False."""
        if self._count is None or self._count.device != finite.device:
            self._count = torch.zeros(1, dtype=torch.int32, device=finite.device)
            self._host = torch.zeros(1, dtype=torch.int32, pin_memory=finite.device.type == "cuda")
        assert self._host is not None  # made with the counter
        self._count.add_(torch.logical_not(finite).to(torch.int32))
        self._host.copy_(self._count, non_blocking=True)

    def count(self) -> int:
        """Non-finite steps so far (waits for the device)."""
        return 0 if self._count is None else int(self._count.item())

    def check(self) -> None:
        """Raise FloatingPointError if the host copy shows steps not reported yet (no sync)."""
        seen = 0 if self._host is None else int(self._host.numpy()[0])  # host memory: no device read
        if seen > self._reported:
            new, self._reported = seen - self._reported, seen
            raise FloatingPointError(
                f"DFA: the output error e = dL/dy of {new} earlier training step(s) held NaN or Inf ({seen} so far): "
                "those steps sent no feedback (every gradient from the DFA output was zeroed, so no layer "
                "moved). Check the loss (divergence; float16 without a loss scaler). dfa.nonfinite_steps "
                "counts such steps; DFA(check_finite=False) turns the check off."
            )


@dataclasses.dataclass
class Record:
    """One feedback point of a forward pass. `tensor` gets the point's gradient: h itself, or the
    pre-activation a for a fused point. Linear points also hold the layer's input and parameters."""

    tensor: torch.Tensor
    activation: str = "none"
    layer_input: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    perturbation: torch.Tensor | None = None  # mode "fdfa": the u_l this point added to its output's tangent

    def inputs(self) -> list[torch.Tensor]:
        """The tensors the DFA output op takes for this point (their order is the plan's)."""
        if self.weight is None:
            return [self.tensor]
        assert self.layer_input is not None  # a linear point holds its layer's input
        return [self.tensor, self.layer_input, self.weight] + ([] if self.bias is None else [self.bias])


@dataclasses.dataclass
class Capture:
    """What a DFA module recorded inside ``with dfa.capture() as cap`` (the last forward pass).

    points: the forward's feedback points (:class:`Record`; ``tensor`` is h, or the pre-activation a
      of a fused point); signals: after backward, the gradient each point's tensor received, shaped
      like it (mode "dfa": the projected error, activation derivative included for fused points;
      mode "bp": backprop's gradient; None where the point got none, e.g. mode "shallow");
      error: e = dL/dy as [N, out_features] (None under ``linear_cross_entropy``, whose error only
      ever exists chunk by chunk).
    """

    points: list[Record] = dataclasses.field(default_factory=list)
    signals: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    error: torch.Tensor | None = None

    def start(self, points: list[Record]) -> None:
        self.points, self.signals, self.error = points, [None] * len(points), None


def record_signals(plan: Plan, error, outs, shapes) -> None:
    """Hand the captured signals (each point's delta [N, d_l], reshaped like its tensor) to the plan's capture."""
    if plan.capture is None:
        return
    starts = _starts(plan)
    plan.capture.error = error
    plan.capture.signals = [o.reshape(shapes[s]) for o, s in zip(outs, starts)]


@dataclasses.dataclass(frozen=True)
class Plan:
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
    signal: str = "error"  # what is projected (methods.SIGNALS): "error", "sign", "ternary" or "target"
    threshold: float = 0.1  # the ternary signal's threshold (methods.ternarize)
    # B is a materialized [out_features, D] parameter passed to the op, not the hash: its rule is the
    # method's matrix, "learned" (dkp: grad e^T h_l) or "jacobian" (fdfa: grad B - the forward estimate)
    learned: str = ""
    monitor: NonFiniteMonitor | None = dataclasses.field(default=None, compare=False, repr=False)
    # set while the DFA module captures (measurements, eager only): the backward fills it in
    capture: Capture | None = dataclasses.field(default=None, compare=False, repr=False)

    def finite_check(self) -> bool:
        """Whether this backward checks its error (on the device; skipped in compiled graphs)."""
        return self.check_finite and self.monitor is not None and not torch.compiler.is_compiling()

    @property
    def fused(self) -> bool:
        return any(a != "none" for a in self.activations) or any(k != "point" for k in self.kinds)


class DFAOutput(torch.autograd.Function):
    """y' = y; backward: e = dL/dy for y, the projected signal for every point. `target` (class
    indices [N] or a float [N, out_features], mode "drtp"; in mode "fdfa" the forward-mode estimate
    of B [out_features, D]) and `feedback` (the learned B, modes "dkp" and "fdfa") are None for the
    other methods."""

    @staticmethod
    def forward(ctx, y, plan, target, feedback, *tensors):
        ctx.plan = plan
        ctx.shapes = [t.shape for t in tensors]
        ctx.dtypes = [t.dtype for t in tensors]
        # the pre-activations and the linear layers' inputs and weights; a learned B reads the activities
        ctx.save_for_backward(target, feedback, *(tensors if plan.fused or plan.learned else ()))
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        plan = ctx.plan
        spec = plan.spec
        target, feedback, *tensors = ctx.saved_tensors
        e = grad_y.reshape(-1, spec.out_features).contiguous()
        if plan.finite_check():  # a non-finite error: zero feedback and a zero gradient for y
            finite = torch.isfinite(e).all()
            plan.monitor.record(finite)
            e = torch.where(finite, e, 0.0)
            grad_y = e.view(grad_y.shape)
        signal = methods.direct_signal(plan.signal, e, target, plan.threshold)
        if plan.error_dtype is not None:
            signal = signal.to(plan.error_dtype)
        if plan.fused or plan.learned:
            outs = _project_points(plan, signal, feedback, tensors, [ctx.dtypes[s] for s in _starts(plan)])
            record_signals(plan, e, outs, ctx.shapes)
            grads = _input_grads(plan, tensors, ctx.shapes, ctx.dtypes, ctx.needs_input_grad[4:], outs)
            grad_feedback = None
            if ctx.needs_input_grad[3] and plan.learned == "jacobian":  # fdfa: B's pull to this forward's estimate
                grad_feedback = feedback - target
            elif ctx.needs_input_grad[3]:
                grad_feedback = learned_grad(plan, e, tensors, feedback)
            return (grad_y, None, None, grad_feedback, *grads)
        out_dtype = _common_dtype(ctx.dtypes)  # written by the projection: no cast pass after it
        if _spans_part_of_b(spec):  # a pipeline stage's points: only their own columns are projected
            outs = ops.project_points(
                signal, spec, plan.storage, plan.backend, scales=list(plan.scales), out_dtype=out_dtype
            )
            grads = [o.reshape(shape).to(dtype) for o, shape, dtype in zip(outs, ctx.shapes, ctx.dtypes)]
            record_signals(plan, e, grads, ctx.shapes)
            return (grad_y, None, None, None, *grads)
        if len(set(plan.scales)) == 1:
            F = ops.project(signal, spec, plan.storage, plan.backend, scale=plan.scales[0], out_dtype=out_dtype)
        else:
            F = ops.project(
                signal, spec, plan.storage, plan.backend, col_scale=column_scales(plan, e.device), out_dtype=out_dtype
            )
        grads = [
            F[:, off : off + w].reshape(shape).to(dtype)
            for off, w, shape, dtype in zip(spec.offsets, spec.widths, ctx.shapes, ctx.dtypes)
        ]
        record_signals(plan, e, grads, ctx.shapes)
        return (grad_y, None, None, None, *grads)


def _spans_part_of_b(spec) -> bool:
    """Whether the points read fewer columns than B has (a pipeline stage's slice of the whole
    model's B): one projection over all of B would compute the other stages' columns too."""
    return max(o + w for o, w in zip(spec.offsets, spec.widths)) - min(spec.offsets) < spec.total_width


def _common_dtype(dtypes) -> torch.dtype | None:
    """The points' dtype when they share one (the projection's output dtype), else None."""
    dtypes = set(dtypes)
    return dtypes.pop() if len(dtypes) == 1 else None


def _starts(plan: Plan) -> list[int]:
    """Index of each point's first tensor among the op's inputs (see Record.inputs)."""
    starts, i = [], 0
    for kind in plan.kinds:
        starts.append(i)
        i += {"point": 1, "linear": 3, "linear+bias": 4}[kind]
    return starts


def _act_inputs(plan: Plan, tensors, N: int) -> list:
    """The pre-activations [N, d_l] the fused epilogue reads (None for plain points)."""
    return [
        None if act == "none" else tensors[s].reshape(N, w)
        for s, act, w in zip(_starts(plan), plan.activations, plan.spec.widths)
    ]


def _project_points(plan: Plan, signal: torch.Tensor, feedback, tensors, point_dtypes) -> list:
    """Every point's delta [N, d_l] in one project_points launch (activation derivatives in its
    epilogue): from the hash's B, or from the learned B `feedback` (scale already in it)."""
    out_dtype = _common_dtype(point_dtypes)  # the points' (pre-activations') dtype
    act_inputs = _act_inputs(plan, tensors, signal.shape[0])
    if feedback is None:
        return ops.project_points(
            signal,
            plan.spec,
            plan.storage,
            plan.backend,
            scales=plan.scales,
            act_inputs=act_inputs,
            activations=list(plan.activations),
            out_dtype=out_dtype,
        )
    spec = plan.spec
    backend = ops.resolve_backend(plan.backend, signal.device, "project_points", "materialized", spec.out_features)
    B = feedback.detach().to(ops.stored_dtype(signal, backend)).contiguous()
    args = (
        signal,
        B,
        spec.seed,
        spec.distribution,
        spec.density,
        list(spec.offsets),
        list(spec.widths),
        [1.0] * len(spec.widths),
        [None if a is None else a.contiguous() for a in act_inputs],
        list(plan.activations),
        out_dtype,
    )
    if backend == "torch":
        return reference.project_points(*args)
    return ops._op(backend, "project_points")(*args)


def learned_grad(plan: Plan, e: torch.Tensor, tensors, feedback: torch.Tensor) -> torch.Tensor:
    """DKP's gradient of the learned B [out_features, D]: e^T h_l for each point's activity h_l
    (f(a) for a fused point), one grouped launch; in the shared layout the prefixes' rules add up."""
    N = e.shape[0]
    activities = []
    for s, act, w in zip(_starts(plan), plan.activations, plan.spec.widths):
        h = tensors[s] if act == "none" else reference.activation(tensors[s], act)
        activities.append(h.reshape(N, w).float())
    e32 = e.float()
    parts = ops.grouped_weight_grad([e32] * len(activities), activities, plan.backend, out_dtype=torch.float32)
    if plan.spec.layout == "independent":
        grad = torch.cat(parts, 1)
    else:
        grad = e32.new_zeros(feedback.shape)
        for part in parts:
            grad[:, : part.shape[1]] += part
    return grad.to(feedback.dtype)


def _input_grads(plan: Plan, tensors, shapes, dtypes, needs_grad, outs) -> list:
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
                _check_allocated(w, l)
                grads[s + 1] = (delta @ w.to(delta.dtype)).reshape(shapes[s + 1]).to(x.dtype)
    return grads


def _check_allocated(weight: torch.Tensor, index: int) -> None:
    """The input gradient delta @ W of a dfa.linear point reads W in the DFA backward, before any
    hook of the layer's module runs: a weight freed after the forward cannot be read there."""
    if torch.compiler.is_compiling() or not weight.numel() or weight.untyped_storage().nbytes():
        return
    raise RuntimeError(
        f"DFA backward: the weight of dfa.linear point #{index} was freed after the forward (FSDP2's "
        f"fully_shard(..., reshard_after_forward=True) does this), but its input needs a gradient, "
        f"delta @ W, computed here. Shard the modules holding such layers with "
        f"reshard_after_forward=False, or use plain points (dfa.point(f(layer(x))); TransformerLM(fused=False))"
    )


class DFALinearCrossEntropy(torch.autograd.Function):
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

        classes = torch.where(target == ignore_index, -1, target) if plan.signal == "target" else None

        def project_chunk(start, stop, e_chunk):
            rows = [None if a is None else a[start:stop] for a in act_inputs]
            e_chunk = methods.direct_signal(
                plan.signal, e_chunk, None if classes is None else classes[start:stop], plan.threshold
            )
            if plan.error_dtype is not None:
                e_chunk = e_chunk.to(plan.error_dtype)
            chunk = ops.project_points(
                e_chunk,
                plan.spec,
                plan.storage,
                plan.backend,
                scales=plan.scales,
                act_inputs=rows,
                activations=list(plan.activations),
                out_dtype=out_dtype,
            )
            for out, c in zip(outs, chunk):
                out[start:stop] = c

        loss, grad_hidden, grad_weight, grad_bias = lm_head.chunked_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=ignore_index, on_chunk=project_chunk, backend=plan.backend
        )
        ctx.finite = None
        if plan.finite_check():  # a non-finite loss: every gradient of the step is zeroed in backward
            ctx.finite = torch.isfinite(loss)
            plan.monitor.record(ctx.finite)
        ctx.plan, ctx.has_bias = plan, bias is not None
        ctx.shapes, ctx.dtypes = [t.shape for t in tensors], [t.dtype for t in tensors]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, *tensors, *outs)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias, *rest = ctx.saved_tensors
        count = len(ctx.shapes)
        tensors, outs = rest[:count], rest[count:]
        if ctx.finite is not None:  # zero, not scale: a NaN times 0 stays NaN
            grad_loss = torch.where(ctx.finite, grad_loss, 0.0)

            def scaled(g):
                return torch.where(ctx.finite, g * grad_loss, 0.0)
        else:

            def scaled(g):
                return g * grad_loss

        outs = [scaled(o) for o in outs]
        record_signals(ctx.plan, None, outs, ctx.shapes)
        grads = _input_grads(ctx.plan, tensors, ctx.shapes, ctx.dtypes, ctx.needs_input_grad[6:], outs)
        return (
            scaled(grad_hidden),
            scaled(grad_weight),
            scaled(grad_bias) if ctx.has_bias else None,
            None,
            None,
            None,
            *grads,
        )


_COL_SCALES: dict = {}


def column_scales(plan: Plan, device) -> torch.Tensor:
    """[D] per-column multipliers (independent layout, one scale per point), cached per device."""

    def build():  # filled on the device (no host copy), static shapes under torch.compile
        return torch.cat(
            [torch.full((w,), s, dtype=torch.float32, device=device) for s, w in zip(plan.scales, plan.spec.widths)]
        )

    if torch.compiler.is_compiling():
        return build()
    key = (plan.scales, plan.spec.widths, str(device))
    if key not in _COL_SCALES:
        _COL_SCALES[key] = build()
    return _COL_SCALES[key]
