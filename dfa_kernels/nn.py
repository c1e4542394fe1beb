"""The DFA module: feedback points in a model's forward, the DFA output at its end.

In a model's forward, ``h = dfa.point(h)`` records a hidden tensor and hands ``h.detach()`` to
the next layer, so no gradient (and no input-gradient GEMM) flows between points; ``y = dfa(y)``
wraps the output in one autograd op (:mod:`dfa_kernels.autograd`) whose backward takes the error
``e = dL/dy``, launches one projection ``F = e @ B`` and returns each point its slice of ``F`` as
the point's gradient. The autograd engine then computes every layer's weight gradient from those
slices, in the same pass.

Two fused forms do more of the backward inside that one op:
- ``h = dfa.point(a, activation="relu")`` records the pre-activation: the projection applies
  relu'(a) in its epilogue, so the point's gradient (w.r.t. ``a``) comes out of one kernel.
- ``h = dfa.linear(x, layer, activation="relu")`` also owns the layer: the backward computes the
  weight gradients of every such layer in one grouped launch (none depends on another).

The other methods of the random-feedback family are modes of the same module
(:mod:`dfa_kernels.methods` has their update rules): the direct ones ("sdfa", "drtp", "ternary",
"dkp", "fdfa") change what this one projection sends; in the layer-wise ones ("fa", "usf", "brsf", "frsf")
the points and the output let gradients through, as in "bp", and the layers converted by
``dk.convert`` (:mod:`dfa_kernels.layerwise`) use their feedback matrix in place of W^T.

Model conversion (points inserted into an existing model) lives in :mod:`dfa_kernels.convert`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from . import methods, ops, reference
from .autograd import Capture, DFALinearCrossEntropy, DFAOutput, NonFiniteMonitor, Plan, Record
from .feedback import FeedbackSpec
from .layerwise import check_init

try:
    from torch.distributed.tensor import DTensor

    HAS_DTENSOR = True
except ImportError:  # a torch built without distributed support
    HAS_DTENSOR = False

MODES = methods.MODES
ACTIVATION_NAMES = ops.ACTIVATIONS[1:]  # what dfa.point(..., activation=) and dfa.linear accept


def _store(signals: list[torch.Tensor | None], index: int, grad: torch.Tensor) -> None:
    signals[index] = grad


def _check_tensor(value: object, what: str) -> None:
    """Points and outputs are float32, float16 or bfloat16 tensors (what the projection runs in)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(
            f"{what} expects a float32, float16 or bfloat16 tensor; got {value.dtype}"
            + (" (convert the model with model.float())" if value.dtype == torch.float64 else "")
        )


def _refuse_sharded(weight: torch.Tensor, call: str, instead: str) -> None:
    """The fused forms run their own kernels on the layer's weight: a sharded DTensor (FSDP2's
    parameters outside the forward that gathers them, tensor parallelism) is refused."""
    if HAS_DTENSOR and isinstance(weight, DTensor):
        raise TypeError(
            f"{call}: the layer's weight is a sharded DTensor ({weight.placements}); the fused DFA "
            f"kernels need the whole weight. Call it inside the forward of the module fully_shard "
            f"wraps (FSDP2 gathers the weights there), or {instead}"
        )


def _check_activation(activation: object) -> None:
    if activation not in ACTIVATION_NAMES:
        raise ValueError(
            f"activation must be one of {', '.join(map(repr, ACTIVATION_NAMES))} (or None); got {activation!r}"
        )


class DFA(nn.Module):
    """Direct Feedback Alignment for one network: ``h = dfa.point(h)`` in forward, ``y = dfa(y)`` at the end.

    mode: "dfa" (points learn from e @ B_l), "bp" (exact gradients through the same model, for
      baselines and alignment) or "shallow" (only layers after the last point learn); the family's
      other methods: "sdfa", "drtp", "ternary", "dkp", "fdfa" (direct) and "fa", "usf", "brsf",
      "frsf" (layer-wise, with layers converted by ``dk.convert``); see :mod:`dfa_kernels.methods`.
      Settable live (a switch to "dkp" or "fdfa" creates its learned matrices at the next forward).
    threshold: mode "ternary": per row, entries of e below threshold * the row's largest |e| send 0.
    init: the layer-wise methods' matrix spread, "xavier" (biotorch's default) or "kaiming" (see
      :mod:`dfa_kernels.layerwise`).
    seed, distribution, layout, density: the feedback matrix (see :class:`FeedbackSpec`).
    scale: "auto" (1/sqrt(d_l) per point, or 1/sqrt(max d) in the shared layout) or a number.
    storage: "virtual" | "materialized" | "auto";  backend: "auto" | "cpu" | "cuda" | "triton" | "torch".
    batch_dims: leading dims of y that index rows of the error (default: all but y's last); every
      point must start with the same dims; its width is the product of the rest.
    check_finite: a backward whose error holds NaN/Inf sends no feedback (every gradient from the
      DFA output is zeroed, so no layer moves), and the next forward raises FloatingPointError.
      Checked on the device, without a host-device sync (skipped under torch.compile); on a GPU
      the error may come a few steps late. ``dfa.nonfinite_steps`` counts such steps.
    error_dtype: the dtype the error e is projected in. "auto": bfloat16 when the forward ran under
      bf16 autocast (e is then fp32, as the final layers run in fp32, but the points are bf16: a
      16-bit projection runs on tensor cores and writes bf16 directly), else e's own dtype.
      None: always e's own dtype. Or torch.float32 / float16 / bfloat16 (float16 needs a loss
      scaler, as for BP: an unscaled error underflows).

    The widths of the points are fixed by the first forward pass; the spec (not B) is saved in
    ``state_dict``.
    """

    def __init__(
        self,
        mode: str = "dfa",
        seed: int = 0,
        distribution: str = "uniform",
        layout: str = "independent",
        scale: float | str = "auto",
        storage: str = "auto",
        backend: str = "auto",
        density: float = 0.1,
        batch_dims: int | None = None,
        check_finite: bool = True,
        error_dtype: torch.dtype | str | None = "auto",
        threshold: float = 0.1,
        init: str = "xavier",
    ) -> None:
        super().__init__()
        # validate the matrix options now rather than at the first forward
        FeedbackSpec(1, (1,), seed, distribution, layout, density).scales(scale)
        ops.resolve_storage(storage, FeedbackSpec(1, (1,)))
        self.storage = storage
        self.mode = mode
        self.threshold = methods.check_threshold(threshold)
        self.init = check_init(init)
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}; got {backend!r}")
        if batch_dims is not None and (not isinstance(batch_dims, int) or batch_dims < 1):
            raise ValueError(f"batch_dims must be None or a positive int; got {batch_dims!r}")
        self.seed, self.distribution, self.layout, self.density = seed, distribution, layout, density
        self.scale, self.backend = scale, backend
        if not (error_dtype is None or error_dtype == "auto" or error_dtype in ops.FLOAT_DTYPES):
            raise ValueError(
                f"error_dtype must be 'auto', None or one of torch.float32, torch.float16, "
                f"torch.bfloat16; got {error_dtype!r}"
            )
        self.batch_dims, self.check_finite, self.error_dtype = batch_dims, check_finite, error_dtype
        self.spec: FeedbackSpec | None = None
        self._points: list[Record] = []
        self._target: torch.Tensor | None = None  # dfa.targets(t): the class targets of the next dfa(y)
        # modes "dkp", "fdfa": the learned matrix [out_features, D] (effective: scale included), made at
        # its first forward
        self.feedback: nn.Parameter | None = None
        self._dual_level: int | None = None  # mode "fdfa": the forward-mode level this module entered
        self._nonfinite = NonFiniteMonitor()
        self._capture: Capture | None = None

    @classmethod
    def tinydfa(cls, mode: str = "dfa", seed: int = 0, **kwargs: Any) -> DFA:
        """TinyDFA's semantics: one shared uniform [-1, 1) matrix, the output flattened per sample,
        point l reads the first d_l columns, everything divided by sqrt(max d_l)."""
        return cls(mode=mode, seed=seed, distribution="uniform", layout="shared", scale="auto", batch_dims=1, **kwargs)

    # ------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        methods.method(value)
        if methods.learns_matrix(value) and self.storage == "virtual":
            raise ValueError(
                f"mode {value!r} learns its feedback matrix, so B is materialized (a parameter): "
                "storage='virtual' cannot hold it; use storage='auto' or 'materialized'"
            )
        self._mode = value

    @property
    def method(self) -> methods.Method:
        """The current mode's point in the method space (signal, matrix, entry)."""
        return methods.METHODS[self._mode]

    # ------------------------------------------------------------ forward
    def point(self, h: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """Record a feedback point; returns h (mode "bp") or h.detach() (modes "dfa", "shallow").

        With ``activation`` ("relu", "gelu", "tanh", "sigmoid", "silu"), `h` is the pre-activation
        a and the point is f(a): returns f(a) (detached outside mode "bp"), and in mode "dfa" the
        projection applies f'(a) itself (fused epilogue), so a's gradient comes out of one kernel.
        """
        _check_tensor(h, "dfa.point(h)")
        through = methods.passes_gradients(self._mode)
        if activation is not None:
            _check_activation(activation)  # before recording: a refused point leaves nothing behind
        record = Record(h) if activation is None else Record(h, activation)
        self._points.append(record)
        out = h if activation is None else reference.activation(h, activation)
        if self._mode == "fdfa" and torch.is_grad_enabled():
            return self._perturbed(out, record)
        return out if through else out.detach()

    def _perturbed(self, out: torch.Tensor, record: Record) -> torch.Tensor:
        """Mode "fdfa": `out` detached, as a dual tensor whose tangent is the one it carries plus a
        fresh u ~ N(0, I) (recorded). The first point of a forward enters a forward-mode level (unless
        the caller holds one), which ``dfa(y)`` leaves after reading y's tangent."""
        if self._dual_level is None and fwAD._current_level < 0:  # no public query of the active level
            self._dual_level = fwAD.enter_dual_level()
        primal, tangent = fwAD.unpack_dual(out)
        u = torch.randn_like(primal)
        record.perturbation = u
        return fwAD.make_dual(primal.detach(), u if tangent is None else tangent + u)

    def _leave_dual_level(self) -> None:
        if self._dual_level is not None:
            fwAD.exit_dual_level(level=self._dual_level)
            self._dual_level = None

    def _jacobian_estimate(self, y: torch.Tensor, points: list[Record], spec: FeedbackSpec) -> torch.Tensor:
        """Mode "fdfa": mean over rows of d^T u_l, d = y's tangent [N, out] (a sum of the points'
        perturbations pushed to the output), as one [out_features, D] matrix in the spec's layout."""
        tangent = fwAD.unpack_dual(y).tangent
        if tangent is None:
            raise RuntimeError(
                "mode 'fdfa': y carries no forward-mode tangent, so no op between the points and "
                "dfa(y) propagated the points' perturbations (was y computed from the points' outputs, "
                "with PyTorch ops that have forward-mode derivatives?)"
            )
        d = tangent.reshape(-1, spec.out_features).float()
        estimate = d.new_zeros(spec.out_features, spec.total_width)
        for record, off, w in zip(points, spec.offsets, spec.widths):
            if record.perturbation is not None:  # a point recorded outside a training forward adds nothing
                estimate[:, off : off + w] += d.T @ record.perturbation.reshape(d.shape[0], w).float()
        return estimate / d.shape[0]

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
        _check_tensor(x, "dfa.linear(x, layer): x")
        if x.shape[-1:] != (layer.in_features,):
            raise ValueError(
                f"dfa.linear(x, layer): x must have shape [*batch, layer.in_features="
                f"{layer.in_features}]; got {tuple(x.shape)}"
            )
        _refuse_sharded(
            layer.weight,
            "dfa.linear(x, layer)",
            "use a plain point: dfa.point(f(layer(x))) (TransformerLM(fused=False))",
        )
        activation = "none" if activation is None else activation
        if activation != "none":
            _check_activation(activation)
        self._refuse_layerwise("dfa.linear(x, layer)", "use the plain layer (f(layer(x)), convert(fuse=False))")
        if self._mode == "bp" or not torch.is_grad_enabled():
            a = F.linear(x, layer.weight, layer.bias)
            self._points.append(Record(a, activation))
            return a if activation == "none" else reference.activation(a, activation)
        with torch.no_grad():  # forward-mode tangents (mode "fdfa") still flow
            a = F.linear(x, layer.weight, layer.bias)
            out = a if activation == "none" else reference.activation(a, activation)
        learns = self._mode != "shallow"  # shallow: the layer does not learn
        record = Record(a, activation, x, layer.weight, layer.bias) if learns else Record(a, activation)
        self._points.append(record)
        return self._perturbed(out, record) if self._mode == "fdfa" else out

    def forward(self, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The DFA output: y itself, whose backward sends the method's signal to every point.

        target: the class targets, for mode "drtp" (the others ignore it, so a training loop can
        always pass it): class indices shaped like y's batch dims (negative: ignored, zero signal),
        or a float tensor shaped like y (one-hot or soft targets, projected as they are). Instead
        of passing it here, ``dfa.targets(t)`` before the forward gives it to the next ``dfa(y)``.
        """
        points, self._points = self._points, []
        target = self._take_target(target)
        self._check_nonfinite()
        _check_tensor(y, "dfa(y)")
        estimate = None
        if self._mode == "fdfa" and torch.is_grad_enabled() and points:
            try:
                points = self._without_stale(y, points)
                spec = self._spec_for(y, [r.tensor for r in points])
                estimate = self._jacobian_estimate(y, points, spec)
            finally:
                self._leave_dual_level()
            y = fwAD.unpack_dual(y).primal  # a caller's own level stays open: the op takes the primal
        if not points and self._mode in methods.LAYERWISE:  # the converted layers do the work: no point needed
            return y
        if not points:
            raise RuntimeError(
                "dfa(y) was called with no feedback point recorded: call h = dfa.point(h) "
                "on hidden tensors during the same forward pass"
            )
        points = self._without_stale(y, points)
        spec = self._spec_for(y, [r.tensor for r in points])
        if self._capture is not None:
            self._start_capture(points, y)
        feedback = self._learned(spec, y.device)  # made at the first forward, so an optimizer can take it
        if self._mode not in methods.DIRECT or not torch.is_grad_enabled():
            return y
        plan = self._plan(spec, points, y.device.type)
        target = self._target_rows(y, target) if plan.signal == "target" else estimate
        inputs = [t for r in points for t in r.inputs()]
        if estimate is not None and fwAD._current_level >= 0:  # a caller's level: the op takes primals
            inputs = [fwAD.unpack_dual(t).primal for t in inputs]
        return DFAOutput.apply(y, plan, target, feedback, *inputs)

    def targets(self, target: torch.Tensor) -> None:
        """Give the class targets to the next ``dfa(y)`` (mode "drtp"; see :meth:`forward`): for
        converted models, whose forward does not take them. Consumed by that call."""
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"dfa.targets(target) expects a torch.Tensor; got {type(target).__name__}")
        self._target = target

    def _take_target(self, target: torch.Tensor | None) -> torch.Tensor | None:
        pending, self._target = self._target, None
        return pending if target is None else target

    def _target_rows(self, y: torch.Tensor, target: object) -> torch.Tensor:
        """The targets as the op takes them: class indices [N] or a float [N, out_features]."""
        assert self.spec is not None  # fixed by this forward's _spec_for
        nb, K = self._batch_dims(y), self.spec.out_features
        if target is None:
            raise ValueError(
                f"mode {self._mode!r} projects the class targets, not the error: pass them as "
                "dfa(y, target=t) or call dfa.targets(t) before the forward (t: class indices "
                f"shaped like y's batch dims {tuple(y.shape[:nb])}, or a float tensor shaped like y)"
            )
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"dfa(y, target=...): target must be a torch.Tensor; got {type(target).__name__}")
        if target.device != y.device:
            raise ValueError(f"dfa(y, target=...): target is on {target.device} but y is on {y.device}")
        if target.is_floating_point():
            if target.shape != y.shape:
                raise ValueError(
                    f"dfa(y, target=...): a float target must have y's shape {tuple(y.shape)}; got "
                    f"{tuple(target.shape)}"
                )
            return target.detach().reshape(-1, K)
        if target.dtype == torch.bool or target.is_complex() or tuple(target.shape) != tuple(y.shape[:nb]):
            raise ValueError(
                f"dfa(y, target=...): class targets must be integer indices shaped like y's batch "
                f"dims {tuple(y.shape[:nb])}; got {target.dtype} {tuple(target.shape)}"
            )
        return target.reshape(-1)

    def _learned(self, spec: FeedbackSpec, device: torch.device) -> nn.Parameter | None:
        """Modes "dkp" and "fdfa": the learned matrix, created at its first use: dkp's from the hash's
        effective B, fdfa's zero (the reference's: the estimates build it)."""
        if not methods.learns_matrix(self._mode):
            return None
        if self.feedback is None and self._mode == "fdfa":
            self.feedback = nn.Parameter(torch.zeros(spec.out_features, spec.total_width, device=device))
        if self.feedback is None:
            B = (
                torch.cat(self.feedback_matrices(device=device, fixed=True), 1)
                if spec.layout == "independent"
                else spec.matrix(torch.float32, device) * spec.scales(self.scale)[0]
            )
            self.feedback = nn.Parameter(B)
        return self.feedback

    def _refuse_layerwise(self, call: str, instead: str) -> None:
        if self._mode in methods.LAYERWISE:
            raise ValueError(
                f"{call} owns its layers' backward, which has no layer-wise form: mode "
                f"{self._mode!r} changes each converted layer's input gradient; {instead}, or a "
                f"direct mode ({', '.join(map(repr, methods.DIRECT))})"
            )

    def linear_cross_entropy(
        self, hidden: torch.Tensor, head: nn.Linear, target: torch.Tensor, ignore_index: int = -100
    ) -> torch.Tensor:
        """``F.cross_entropy(head(hidden), target)`` as the DFA output, without the [N, vocab] logits.

        Replaces ``dfa(head(hidden))`` + the loss when the error is taken after the vocabulary
        head: row chunk by row chunk, the logits, the loss, its gradient e (the DFA error) and
        e's projection to every point are computed and the chunk is dropped; the head and
        `hidden` get their exact gradients. hidden: [*batch, d]; target: [*batch] class indices.
        """
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear; got {type(head).__name__}")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.shape[-1] != head.in_features:
            raise ValueError(
                f"hidden must have shape [*batch, head.in_features={head.in_features}]; got "
                f"{tuple(getattr(hidden, 'shape', ()))}"
            )
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"target must have shape {tuple(hidden.shape[:-1])} (hidden's batch dims); got "
                f"{tuple(getattr(target, 'shape', ()))}"
            )
        _refuse_sharded(
            head.weight,
            "dfa.linear_cross_entropy(hidden, head, target)",
            "take the error before the head: dfa(hidden), then the head and the loss "
            "(TransformerLM(error_at='hidden'))",
        )
        from . import lm_head

        self._refuse_layerwise(
            "dfa.linear_cross_entropy",
            "take the error before the head: dfa(hidden), then the (converted) head and the loss",
        )
        if methods.learns_matrix(self._mode):
            raise ValueError(
                f"mode {self._mode!r} materializes its learned B [vocab, D], which the chunked head never "
                "does: take the error before the head (dfa(hidden), TransformerLM(error_at='hidden'))"
            )
        points, self._points = self._points, []
        self._target = None
        self._check_nonfinite()
        if not points:
            raise RuntimeError("dfa.linear_cross_entropy was called with no feedback point recorded")
        logits_shape = hidden.new_empty(()).expand(*hidden.shape[:-1], head.out_features)  # a view: no memory
        points = self._without_stale(logits_shape, points)
        spec = self._spec_for(logits_shape, [r.tensor for r in points])
        h2, t1 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
        if self._capture is not None:
            self._start_capture(points, None)
        if self._mode not in methods.DIRECT or not torch.is_grad_enabled():
            return lm_head.linear_cross_entropy(
                h2, head.weight, t1, head.bias, ignore_index=ignore_index, backend=self.backend
            )
        plan = self._plan(spec, points, hidden.device.type)
        return DFALinearCrossEntropy.apply(
            h2, head.weight, head.bias, t1, plan, ignore_index, *[t for r in points for t in r.inputs()]
        )

    def _plan(self, spec: FeedbackSpec, points: list[Record], device_type: str) -> Plan:
        kinds = tuple("point" if r.weight is None else ("linear" if r.bias is None else "linear+bias") for r in points)
        method = self.method
        return Plan(
            spec,
            tuple(spec.scales(self.scale)),
            self.storage,
            self.backend,
            self.check_finite,
            kinds,
            tuple(r.activation for r in points),
            self._error_dtype(device_type),
            method.signal,
            self.threshold,
            (method.matrix or "") if methods.learns_matrix(self._mode) else "",
            self._nonfinite,
            self._capture,
        )

    def _check_nonfinite(self) -> None:
        """Raise for the non-finite errors of earlier backwards that the host has seen (no sync)."""
        if self.check_finite and not torch.compiler.is_compiling():
            self._nonfinite.check()

    @property
    def nonfinite_steps(self) -> int:
        """Backward passes whose error held NaN/Inf and sent no feedback (reading it syncs with the device)."""
        return self._nonfinite.count()

    def _error_dtype(self, device_type: str) -> torch.dtype | None:
        if self.error_dtype != "auto":
            assert not isinstance(self.error_dtype, str)  # __init__ took 'auto', None or a float dtype
            return self.error_dtype
        under_bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
        return torch.bfloat16 if under_bf16 else None

    def _batch_dims(self, y: torch.Tensor) -> int:
        if self.batch_dims is not None:
            if y.dim() <= self.batch_dims:
                raise ValueError(
                    f"dfa(y): y of shape {tuple(y.shape)} has no feature dim after batch_dims={self.batch_dims}"
                )
            return self.batch_dims
        if y.dim() < 2:
            raise ValueError(
                f"dfa(y) expects y of shape [*batch, out_features] (at least 2-D); got "
                f"{tuple(y.shape)} (use y.unsqueeze(-1) for one output per row)"
            )
        return y.dim() - 1

    def _without_stale(self, y: torch.Tensor, points: list[Record]) -> list[Record]:
        """Once the widths are fixed, surplus points at the front whose followers match the spec
        were recorded before this forward pass (by a forward that raised before dfa(y), or by
        dfa.point outside a forward): they are dropped, with a warning, never mixed in."""
        spec = self.spec
        if spec is None or len(points) <= len(spec.widths):
            return points
        count = len(spec.widths)
        nb = self._batch_dims(y)
        tail = points[-count:]
        if all(
            tuple(r.tensor.shape[:nb]) == tuple(y.shape[:nb])
            and r.tensor.dim() > nb
            and math.prod(r.tensor.shape[nb:]) == w
            for r, w in zip(tail, spec.widths)
        ):
            warnings.warn(
                f"dfa(y): discarded {len(points) - count} stale feedback point(s) recorded before this "
                "forward pass (by a forward that raised before dfa(y), or dfa.point called outside a "
                "forward); dfa.discard_points() drops them explicitly",
                RuntimeWarning,
                stacklevel=3,
            )
            return tail
        return points

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
                    f"have at least one more (its width); points with other row counts are not supported"
                )
            if p.device != y.device:
                raise ValueError(
                    f"feedback point #{index} is on {p.device} but the output y is on {y.device}: "
                    f"every point must be on the output's device"
                )
            if math.prod(p.shape[nb:]) == 0:
                raise ValueError(
                    f"feedback point #{index} has shape {tuple(p.shape)}: zero width (no feature "
                    f"after the batch dims {batch}); a point needs at least one feature"
                )
            widths.append(math.prod(p.shape[nb:]))
        if out_features == 0:
            raise ValueError(f"dfa(y): y of shape {tuple(y.shape)} has no output feature after the batch dims {batch}")
        if self.spec is None:
            self.spec = FeedbackSpec(
                out_features, tuple(widths), self.seed, self.distribution, self.layout, self.density
            )
        elif self.spec.widths != tuple(widths) or self.spec.out_features != out_features:
            raise ValueError(
                f"this DFA was built for out_features={self.spec.out_features} and point widths "
                f"{list(self.spec.widths)}, but this forward pass has out_features={out_features} and widths "
                f"{widths}: the feedback matrix is fixed after the first step (call dfa.reset() to rebuild it; "
                f"if the first forward recorded points that were not its own, e.g. left by a forward that raised "
                f"before dfa(y), that is the fix too)"
            )
        return self.spec

    # ------------------------------------------------------------ inspection and state
    @contextlib.contextmanager
    def capture(self) -> Iterator[Capture]:
        """``with dfa.capture() as cap:`` records what flows through the points (eager mode).

        After a forward, ``cap.points`` holds its feedback points; after the backward,
        ``cap.signals[l]`` the gradient point l's tensor received (the projected error in mode "dfa",
        backprop's gradient in mode "bp", None in mode "shallow") and ``cap.error`` the output error
        ``e = dL/dy`` [N, out_features]. The training step itself is unchanged: alignment
        measurements and embedding studies read it (``dfa_kernels.studies``).
        """
        cap = Capture()
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None

    def _start_capture(self, points: list[Record], y: torch.Tensor | None) -> None:
        cap = self._capture
        assert cap is not None  # called inside dfa.capture()
        cap.start(points)
        if not methods.passes_gradients(self._mode) or not torch.is_grad_enabled():
            return  # direct modes: the backward records (Plan.capture); "shallow": no point gets a signal
        for index, record in enumerate(points):
            if record.tensor.requires_grad:
                record.tensor.register_hook(functools.partial(_store, cap.signals, index))
        if y is not None and y.requires_grad:
            assert self.spec is not None  # fixed by this forward's _spec_for
            width = self.spec.out_features
            y.register_hook(lambda grad: setattr(cap, "error", grad.reshape(-1, width)))

    def reset(self) -> None:
        """Forget the widths (the next forward pass fixes them again), and a learned matrix (modes "dkp", "fdfa")."""
        self._leave_dual_level()
        self.spec, self._points, self._target, self.feedback = None, [], None, None

    @property
    def pending_points(self) -> tuple[Record, ...]:
        """The points recorded since the last ``dfa(y)`` (what the next one will consume)."""
        return tuple(self._points)

    def discard_points(self) -> int:
        """Drop the pending points (e.g. after a forward that raised before ``dfa(y)``); returns how many."""
        count = len(self._points)
        self._points = []
        self._leave_dual_level()  # mode "fdfa": the aborted forward's tangents go with its points
        return count

    def resolved_backend(self, device: torch.device | str) -> str:
        """The projection backend this module runs on `device` (what 'auto' picks)."""
        if self.spec is None:
            return ops.resolve_backend(self.backend, device)
        storage = ops.resolve_storage(self.storage, self.spec, device)
        return ops.resolve_backend(self.backend, device, "project", storage, self.spec.out_features)

    def feedback_matrices(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", fixed: bool = False
    ) -> list[torch.Tensor]:
        """Effective [out_features, d_l] matrix of each point, scale applied, in point order: the
        learned ones in modes "dkp" and "fdfa" (once made), else (or with fixed=True) the hash's."""
        if self.spec is None:
            raise RuntimeError("feedback_matrices() needs the point widths: run one forward pass first")
        if methods.learns_matrix(self._mode) and self.feedback is not None and not fixed:
            B = self.feedback.detach()
            return [
                B[:, off : off + w].to(dtype=dtype, device=device)
                for off, w in zip(self.spec.offsets, self.spec.widths)
            ]
        B = self.spec.matrix(torch.float32, device)
        return [
            (B[:, off : off + w] * s).to(dtype)
            for off, w, s in zip(self.spec.offsets, self.spec.widths, self.spec.scales(self.scale))
        ]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "spec": None if self.spec is None else self.spec.state(),
            "scale": self.scale,
            "batch_dims": self.batch_dims,
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"spec", "scale", "batch_dims"} <= state.keys():
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"DFA state (the '_extra_state' entry of a state_dict) must be a dict with keys "
                f"'spec', 'scale', 'batch_dims', as DFA.state_dict() saves it; got {got}"
            )
        spec = None if state["spec"] is None else FeedbackSpec.from_state(state["spec"])
        if (
            spec is not None
            and self.spec is not None
            and (spec.widths, spec.out_features) != (self.spec.widths, self.spec.out_features)
        ):
            raise ValueError(
                f"this DFA's points have widths {list(self.spec.widths)} and out_features "
                f"{self.spec.out_features}, but the state to load has widths {list(spec.widths)} and "
                f"out_features {spec.out_features}: it belongs to another model (dfa.reset() first to "
                f"take it anyway)"
            )
        FeedbackSpec(1, (1,)).scales(state["scale"])  # a valid scale, or a ValueError naming it
        self.spec = spec
        self.scale, self.batch_dims = state["scale"], state["batch_dims"]
        if self.spec is not None:
            self.seed, self.distribution = self.spec.seed, self.spec.distribution
            self.layout, self.density = self.spec.layout, self.spec.density

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a learned matrix (modes "dkp", "fdfa") is made at the first forward: a checkpoint that has one makes it here
        key = prefix + "feedback"
        if key in state_dict and self.feedback is None:
            self.feedback = nn.Parameter(torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"mode={self._mode!r}, seed={self.seed}, distribution={self.distribution!r}, "
            f"layout={self.layout!r}, scale={self.scale!r}, storage={self.storage!r}, "
            f"backend={self.backend!r}, error_dtype={self.error_dtype!r}, "
            f"widths={None if self.spec is None else list(self.spec.widths)}"
        )
