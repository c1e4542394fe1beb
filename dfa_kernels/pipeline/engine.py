"""Pipeline-parallel training over S processes: DFA's own schedule, and backprop's through
``torch.distributed.pipelining`` (GPipe, 1F1B) on the same stages, as the baseline.

The DFA schedule (``schedule="dfa"``), per global batch of M microbatches:
- microbatch m's activation flows forward stage to stage (P2P ``isend``/``recv``);
- the last stage computes the loss, its error ``e = dL/dy`` and sends it at once to every other
  stage (one ``isend`` each), then runs its own backward (head and suffix exactly, its points from
  e);
- every other stage posted a receive for each microbatch's e at the start of the step; after each
  forward it runs the backward of every microbatch whose e has arrived (interleaved with later
  forwards), then waits for the rest. A stage's backward is the DFA output's own op on its points
  only: ``e @ B_l * scale`` from its columns of B (a :class:`StageSpec`: the global spec's
  offsets, so B is regenerated locally from the seed, never sent), then autograd inside the stage.
  No activation gradient travels backward and no stage waits for another's backward.
- each rank steps its optimizer on its own parameters once per global batch (synchronous: the
  gradients are those of the single-process run accumulating the same microbatches, loss / M).

Pipeline × data parallelism (2-D): R replicas of the S-stage pipeline over S·R ranks
(:func:`pipeline_groups` makes each rank's pipeline group and its data group: stage s of every
replica). Each replica runs its own share of the global batch; after the step, every stage averages
its gradients over its data group (one all-reduce per parameter, what DDP's reducer does, written
out because a stage's backward runs once per microbatch, interleaved with forwards, where DDP expects
one backward per forward) and the loss over the replicas: the step equals one pipeline over the
whole batch, and so the single process accumulating all R·M microbatches.

Not offered: an asynchronous variant (a stage updating as soon as its own microbatches are done)
would let stage s run microbatches of step t+1 with new weights while later stages still use step
t's: the forward of one sample would mix weight versions (PipeDream's staleness), which has no
single-process equivalent to test against; the synchronous step loses only the drain at its end.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time

import torch
import torch.distributed as dist

from .. import ops
from ..autograd import DFAOutput
from ..feedback import FeedbackSpec
from .parts import Parts, StageModule, balanced_cuts, parts_of

SCHEDULES = ("dfa", "gpipe", "1f1b")
DFA_MODES = ("dfa", "sdfa", "ternary")  # direct modes whose signal is a function of e alone
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]
_HEADER = 11  # tensors in the message, ndim, dtype code, up to 8 sizes
_MAX_TUPLE = 8  # tensors one message (a stage's output) may hold: each has its own pair of tags
_POLL_S = 0.01  # longest sleep between two checks of the receives (a message's arrival wakes the step)


@dataclasses.dataclass(frozen=True)
class StageSpec(FeedbackSpec):
    """A stage's points as columns of the whole model's B: `columns` are their global offsets,
    `full_width` the global D (the scale 'auto' of the shared layout reads it)."""

    columns: tuple[int, ...] = ()
    full_width: int = 0

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.columns

    @property
    def total_width(self) -> int:
        return self.full_width


def stage_spec(spec: FeedbackSpec, first: int, stop: int) -> StageSpec:
    """The columns of points first..stop-1 of `spec`."""
    return StageSpec(
        spec.out_features,
        spec.widths[first:stop],
        spec.seed,
        spec.distribution,
        spec.layout,
        spec.density,
        columns=spec.offsets[first:stop],
        full_width=spec.total_width,
    )


@dataclasses.dataclass
class StepStats:
    """What one step of this rank did: seconds computing and waiting, bytes sent (payload and
    shape headers) by kind."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    wall_s: float = 0.0
    bytes_activations: int = 0
    bytes_gradients: int = 0  # BP: activation gradients sent backward
    bytes_errors: int = 0  # DFA: the errors e sent by the last stage
    bytes_headers: int = 0
    bytes_allreduce: int = 0  # 2-D: this stage's gradients (and the loss) averaged over the replicas
    allreduce_s: float = 0.0
    # DFA: (kind, microbatch, start_s, stop_s) from the step's start; kind "F" forward, "E" the last
    # stage's loss and error (head included), "B" a stage's DFA backward
    events: list = dataclasses.field(default_factory=list)


def pipeline_groups(stages: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's (pipeline group, data group) for R = world / `stages` replicas of an S-stage
    pipeline: replica r is ranks r·S .. r·S + S - 1 (rank r·S + s runs stage s), and stage s's data
    group is ranks s, S + s, 2S + s, ... Every rank must call it (each group is made on all ranks,
    in the same order)."""
    world = dist.get_world_size()
    if not isinstance(stages, int) or stages < 1 or world % stages:
        raise ValueError(f"stages={stages!r} must divide the world size ({world}): world = stages x replicas")
    rank, replicas = dist.get_rank(), world // stages
    mine = {}
    for r in range(replicas):
        group = dist.new_group(list(range(r * stages, (r + 1) * stages)))
        if rank // stages == r:
            mine["pipeline"] = group
    for s in range(stages):
        group = dist.new_group(list(range(s, world, stages)))
        if rank % stages == s:
            mine["data"] = group
    return mine["pipeline"], mine["data"]


class Pipeline:
    """One rank's part of a pipeline-parallel run of `model` over the process group `group`.

    model: a zoo model (:func:`parts_of`) or a :class:`Parts`; every rank builds the same model.
    stages: S, the group's size (one stage per rank, rank s runs stage s).
    microbatches: M, dividing every global batch's rows.
    example: a small input batch (every rank): it fixes the feedback spec and checks the cuts.
    schedule: "dfa" (modes dfa, sdfa, ternary) or, for the BP baseline (mode "bp"), "gpipe" or
      "1f1b" (``torch.distributed.pipelining``'s ScheduleGPipe / Schedule1F1B).
    cuts: the block index where each stage starts plus the block count (default: balanced).
    group: the pipeline's process group (default: the world); data_group: this stage's replicas (2-D:
      :func:`pipeline_groups`), whose gradients and loss each step averages.
    """

    def __init__(
        self,
        model,
        stages: int,
        microbatches: int,
        example,
        *,
        schedule: str = "dfa",
        cuts=None,
        group=None,
        data_group=None,
        device=None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Pipeline needs an initialised torch.distributed process group (one rank per stage)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}")
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise ValueError(f"microbatches must be a positive int; got {microbatches!r}")
        self.parts: Parts = parts_of(model)
        self.group, self.schedule, self.microbatches = group, schedule, microbatches
        self.data_group = data_group
        self.replicas = 1 if data_group is None else dist.get_world_size(data_group)
        size = dist.get_world_size(group)
        if stages != size:
            raise ValueError(f"stages={stages} must equal the process group's size ({size}): one stage per rank")
        self.stages, self.rank = stages, dist.get_rank(group)
        self.cuts = balanced_cuts(len(self.parts.blocks), stages) if cuts is None else self._check_cuts(cuts)
        mode = self.parts.dfa.mode
        if schedule == "dfa" and mode not in DFA_MODES:
            raise ValueError(
                f"schedule 'dfa' needs a DFA mode whose signal is the error alone ({', '.join(DFA_MODES)}); "
                f"the model's dk.DFA is in mode {mode!r}"
                + (": use schedule='gpipe' or '1f1b' for backprop" if mode == "bp" else "")
            )
        if schedule != "dfa" and mode != "bp":
            raise ValueError(
                f"schedule {schedule!r} is backprop's (torch.distributed.pipelining); the model's "
                f"dk.DFA is in mode {mode!r}: build it in mode 'bp', or use schedule='dfa'"
            )
        self.device = torch.device(device) if device is not None else _device_of(self.parts)
        self.first, self.last = self.rank == 0, self.rank == stages - 1
        self.modules = [
            StageModule(
                self.parts,
                self.cuts[s],
                self.cuts[s + 1],
                s == 0,
                s == stages - 1,
                with_head=schedule != "dfa",
                drop_points=schedule != "dfa",
            )
            for s in range(stages)
        ]
        self.module = self.modules[self.rank]
        self._owners = self._ownership()
        self.stats = StepStats()
        if schedule == "dfa":
            self._prime(example)
        else:
            self.module.register_forward_hook(self._count_bp_bytes)
            self._bp_calls: list[tuple[int, int]] = []
            self._torch_schedules: dict = {}  # batch rows -> torch's schedule for those microbatch shapes

    # ------------------------------------------------------------ setup
    def _check_cuts(self, cuts) -> list[int]:
        cuts = list(cuts)
        n = len(self.parts.blocks)
        if (
            len(cuts) != self.stages + 1
            or cuts[0] != 0
            or cuts[-1] != n
            or any(b <= a for a, b in itertools.pairwise(cuts))
        ):
            raise ValueError(
                f"cuts must be {self.stages + 1} increasing block indices from 0 to {n} (each stage "
                f"gets at least one block); got {cuts}"
            )
        return cuts

    def _ownership(self) -> list[dict]:
        """For each stage, its parameters and buffers by identity; one used by two stages is refused."""
        owners, seen = [], {}
        for s, module in enumerate(self.modules):
            mine = {}
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                if id(t) in seen and seen[id(t)] != s:
                    raise ValueError(
                        f"{name} is used by stages {seen[id(t)]} and {s}: a tied parameter cannot be "
                        f"split across stages (untie it, or cut elsewhere)"
                    )
                seen[id(t)] = s
                mine[id(t)] = t
            owners.append(mine)
        return owners

    def _prime(self, example) -> None:
        """Run the whole model once on `example` (eval mode, the RNG untouched): count each stage's
        points, fix the feedback spec as one process would, check that no layer trained by backprop
        spans a cut (the activation leaving a stage must carry no autograd graph)."""
        parts, dfa = self.parts, self.parts.dfa
        modules = [m for m in (parts.prefix, *parts.blocks, parts.suffix) if m is not None]
        training = {m: m.training for mod in modules for m in mod.modules()}
        counts = [0] * self.stages
        dfa.discard_points()
        try:
            with (
                torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []),
                torch.enable_grad(),
            ):
                for m in training:
                    m.train(False)
                x = _to(example, self.device)
                for s, module in enumerate(self.modules):
                    before = len(dfa.pending_points)
                    x = module(x)
                    counts[s] = len(dfa.pending_points) - before
                    state = x if isinstance(x, tuple) else (x,)
                    if parts.skip and s < self.stages - 1:
                        state = state[:-1]  # the skip branch: its gradient is e, stage 0 takes it there
                    if s < self.stages - 1 and any(t.requires_grad for t in state):
                        raise ValueError(
                            f"the activation leaving stage {s} (after block {self.cuts[s + 1] - 1}) carries an "
                            f"autograd graph: a layer trained by backprop spans the cut between stages {s} and "
                            f"{s + 1}, which DFA's schedule cannot split (no gradient travels backward). End the "
                            f"block with a feedback point (h = dfa.point(h)) or cut elsewhere"
                        )
                for s, count in enumerate(counts):  # refused before the DFA's spec is fixed
                    if count == 0:
                        raise ValueError(
                            f"stage {s} (blocks {self.cuts[s]}..{self.cuts[s + 1] - 1}) has no feedback "
                            f"point: its layers would get no DFA signal. Use fewer stages, other cuts, "
                            f"or a placement with a point in every block"
                        )
                points = list(dfa.pending_points)
                dfa.discard_points()
                dfa._spec_for(x, [r.tensor for r in points])  # the single-process spec (fixed on first use)
        finally:
            for m, flag in training.items():
                m.train(flag)
            dfa.discard_points()
        self.point_counts = counts
        start = sum(counts[: self.rank])
        self.spec = stage_spec(dfa.spec, start, start + counts[self.rank])

    def _bp_schedule(self, rows: int | None):
        """torch's schedule for a batch of `rows` rows: a PipelineStage fixes its buffers' shapes at
        its first step, so a batch of another size (an epoch's last, smaller batch) gets its own
        stage and schedule (same module, same parameters), built on every rank at the same step."""
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
        )

        if rows not in self._torch_schedules:
            stage = PipelineStage(self.module, self.rank, self.stages, self.device, group=self.group)
            kind = ScheduleGPipe if self.schedule == "gpipe" else Schedule1F1B
            # each microbatch's loss weighted by its rows' share of the batch (unequal microbatches too)
            self._torch_schedules[rows] = kind(stage, self.microbatches, loss_fn=self._weighted_loss, scale_grads=False)
        return self._torch_schedules[rows]

    def _weighted_loss(self, output, target) -> torch.Tensor:
        return self.parts.loss(output, target) * (target.shape[0] / self._batch_rows)

    # ------------------------------------------------------------ what this rank owns
    def parameters(self) -> list[torch.nn.Parameter]:
        """This stage's parameters (what its optimizer steps)."""
        return [p for p in self._owners[self.rank].values() if isinstance(p, torch.nn.Parameter)]

    def feedback_matrices(self) -> list[torch.Tensor]:
        """This stage's points' effective matrices [out_features, d_l] (scale applied), built as its
        backward builds them: the projection of the identity through its own columns."""
        dfa = self.parts.dfa
        eye = torch.eye(self.spec.out_features, device=self.device)
        return ops.project_points(eye, self.spec, "virtual", dfa.backend, scales=self.spec.scales(dfa.scale))

    # ------------------------------------------------------------ one step
    def step(self, inputs=None, targets=None, batch_rows: int | None = None) -> torch.Tensor:
        """Forward and backward of one global batch (inputs on stage 0, targets on the last stage;
        other ranks may pass them too, unused). Gradients accumulate in this stage's parameters;
        returns the batch's loss on every rank. Each microbatch's loss is weighted by its share of
        the batch's rows (1/M when they split evenly), so the step is the single process's mean
        over the whole batch even when the rows do not divide into M equal microbatches. With
        replicas, `batch_rows` is the global batch's (default: this share's times the replicas)."""
        start = self._start = time.perf_counter()
        self.stats = StepStats()
        if self.last:
            self._batch_rows = batch_rows or _rows(targets) * self.replicas
        xs = self._split(inputs, "inputs") if self.first else None
        ts = self._split(targets, "targets") if self.last else None
        if self.schedule == "dfa":
            loss = self._step_dfa(xs, ts)
        else:
            # every rank keys torch's schedule by the rows it was given (the trainer passes the batch to all)
            given = inputs if inputs is not None else targets
            loss = self._step_bp(inputs, targets, None if given is None else _rows(given))
        loss = loss.detach().reshape(1).to(self.device, torch.float32)
        dist.broadcast(loss, self._global(self.stages - 1), group=self.group)
        if self.replicas > 1:
            self._average_over_replicas(loss)
        self.stats.wall_s = time.perf_counter() - start
        return loss[0]

    def _average_over_replicas(self, loss: torch.Tensor) -> None:
        """This stage's gradients and the loss summed over the data group: each replica's
        microbatches are weighted by their share of the global batch, so the sum is its mean."""
        tic = time.perf_counter()
        for t in [loss, *(p.grad for p in self.parameters() if p.grad is not None)]:
            dist.all_reduce(t, group=self.data_group)
            self.stats.bytes_allreduce += t.numel() * t.element_size()
        self.stats.allreduce_s = time.perf_counter() - tic

    def _split(self, batch, name: str) -> list:
        """The batch's microbatches: tensors, or tuples of tensors for a tuple of inputs."""
        several = isinstance(batch, (tuple, list))
        tensors = list(batch) if several else [batch]
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(
                f"step({name}=): stage {self.rank} needs the batch's {name} as a tensor or a tuple of "
                f"tensors; got {type(batch).__name__}"
            )
        rows = {t.shape[0] for t in tensors}
        if len(rows) != 1 or min(rows) < self.microbatches:
            raise ValueError(
                f"step({name}=): the batch's tensors must have one row count, at least microbatches="
                f"{self.microbatches}; got rows {sorted(rows)}"
            )
        chunks = [t.to(self.device).tensor_split(self.microbatches) for t in tensors]
        return list(zip(*chunks)) if several else list(chunks[0])

    def _global(self, stage: int) -> int:
        return stage if self.group is None else dist.get_global_rank(self.group, stage)

    def _step_bp(self, inputs, targets, rows: int | None) -> torch.Tensor:
        tic = time.perf_counter()
        losses = []
        if rows is not None and rows % self.microbatches:
            raise ValueError(
                f"step(): the batch's {rows} rows do not split into microbatches={self.microbatches} equal ones, "
                "which torch.distributed.pipelining's stages need (their buffers have one shape); DFA's "
                "schedule takes unequal microbatches"
            )
        schedule = self._bp_schedule(rows)
        self._bp_calls.clear()
        args = _to(inputs, self.device) if self.first else None
        args = args if isinstance(args, tuple) else (args,)
        if self.first and self.last:
            schedule.step(*args, target=targets.to(self.device), losses=losses)
        elif self.first:
            schedule.step(*args)
        elif self.last:
            schedule.step(target=targets.to(self.device), losses=losses)
        else:
            schedule.step()
        self.stats.forward_s = time.perf_counter() - tic  # forward and backward: torch's schedule interleaves them
        calls = self._bp_calls[-self.microbatches :]  # the microbatches' forwards
        self.stats.bytes_activations = sum(sent for sent, _ in calls)
        self.stats.bytes_gradients = sum(received for _, received in calls)
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    def _count_bp_bytes(self, module, args, out) -> None:
        """BP's traffic, from the shapes its stage sees: the activations sent forward and, back across
        the same boundary, their gradients (a float input of a later stage receives one). Recorded
        per forward call; the step keeps its last M (torch's stages also run a forward of their own
        in their first step, to infer shapes, which sends nothing)."""
        outs = out if isinstance(out, tuple) else (out,)
        if outs[0].device.type == "meta":  # torch's shape inference
            return
        sent = 0 if self.last else sum(t.numel() * t.element_size() for t in outs)
        received = 0 if self.first else sum(x.numel() * x.element_size() for x in args if x.is_floating_point())
        self._bp_calls.append((sent, received))

    def _step_dfa(self, xs, ts) -> torch.Tensor:
        """Forward first: a stage runs the next microbatch's forward whenever its input is there (later
        stages wait on it), otherwise the backward of the oldest microbatch whose e is there, otherwise
        it polls both receives. The last stage sends e before its own backward."""
        dfa, M, S = self.parts.dfa, self.microbatches, self.stages
        sends, records, ready = [], [None] * M, collections.deque()
        arrived = threading.Condition()
        inputs = None if self.first else _Inbox(self, self.rank - 1, range(M), arrived)
        errors = None if self.last else _Inbox(self, S - 1, range(M, 2 * M), arrived)
        m = done = 0
        total = torch.zeros((), device=self.device)
        dfa.discard_points()
        while done < M:
            if m < M and (self.first or inputs.has(m)):
                out, recs = self._forward(xs[m] if self.first else inputs.take(m), m)
                if self.last:
                    loss, e = self._error(out, ts[m], m)
                    for s in range(S - 1):
                        sends += self._send(e, s, M + m, "errors")
                    ready.append((recs, out, e, m))
                    total = total + loss
                else:
                    sends += self._send(_detached(out), self.rank + 1, m, "activations")
                    records[m] = recs
                m += 1
            elif ready:
                self._backward(*ready.popleft())
                done += 1
            elif not self.last and errors.has(done):
                self._backward(records[done], None, errors.take(done), done)
                records[done] = None
                done += 1
            else:
                with arrived:  # checked again under the lock: an arrival cannot slip in before the wait
                    if not (
                        (inputs is not None and m < M and inputs.has(m)) or (errors is not None and errors.has(done))
                    ):
                        arrived.wait(_POLL_S)
        for work in sends:
            work.wait()
        return total

    def _forward(self, x, m: int):
        """This stage's forward of microbatch m: its output and what its backward needs (the points
        it recorded, and on stage 0 of a model with a skip branch, that branch's output)."""
        dfa = self.parts.dfa
        tic = time.perf_counter()
        out = self.module(x)  # a tuple state too: StageModule unpacks it
        recs = list(dfa.pending_points)
        dfa.discard_points()
        self._event("F", m, tic)
        if len(recs) != self.point_counts[self.rank]:
            raise RuntimeError(
                f"stage {self.rank} recorded {len(recs)} feedback points for microbatch {m}, "
                f"{self.point_counts[self.rank]} when primed: the forward's points must not "
                f"depend on the batch"
            )
        if self.parts.skip and self.first and not self.last:
            recs.append(_Skip(out[-1]))
        return out, recs

    def _error(self, y: torch.Tensor, target, m: int):
        """The last stage: the loss of microbatch m (/ M) through the head, the head's exact
        gradients, and the error e = dL/dy."""
        tic = time.perf_counter()
        y_leaf = y.detach().requires_grad_()
        head_out = self.parts.head(y_leaf) if self.parts.head is not None else y_leaf
        loss = self.parts.loss(head_out, target) * (target.shape[0] / self._batch_rows)
        loss.backward()
        self._event("E", m, tic)
        return loss.detach(), y_leaf.grad

    def _event(self, kind: str, m: int, tic: float) -> None:
        toc = time.perf_counter()
        if kind == "F":
            self.stats.forward_s += toc - tic
        else:
            self.stats.backward_s += toc - tic
        self.stats.events.append((kind, m, tic - self._start, toc - self._start))

    def _backward(self, recs, y, e: torch.Tensor, m: int) -> None:
        """This stage's DFA backward for one microbatch: the output op on its points only (and on
        stage 0, the skip branch's backward from e, its exact gradient)."""
        tic = time.perf_counter()
        dfa = self.parts.dfa
        skips = [r.tensor for r in recs if isinstance(r, _Skip)]
        recs = [r for r in recs if not isinstance(r, _Skip)]
        if y is None:  # a stand-in for y (only its shape matters): no [N, out] memory
            y = torch.zeros((), device=e.device, dtype=e.dtype, requires_grad=True).expand(e.shape)
        plan = dfa._plan(self.spec, recs, e.device.type)
        out = DFAOutput.apply(y, plan, None, None, *[t for r in recs for t in r.inputs()])
        torch.autograd.backward([out, *skips], [e.reshape(out.shape), *(e.reshape(s.shape) for s in skips)])
        self._event("B", m, tic)

    # ------------------------------------------------------------ P2P with shape headers
    def _send(self, message, stage: int, slot: int, kind: str) -> list:
        """A tensor or a tuple of tensors to `stage`: each its shape header, then its data, on the
        message's own tags (slot x _MAX_TUPLE + i)."""
        tensors = list(message) if isinstance(message, tuple) else [message]
        if not 1 <= len(tensors) <= _MAX_TUPLE or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError(
                f"a stage boundary carries a tensor or a tuple of 1 to {_MAX_TUPLE} tensors; got "
                f"{type(message).__name__} of {len(tensors)}"
            )
        dst, works = self._global(stage), []
        for i, t in enumerate(tensors):
            t = t.contiguous()
            if t.dim() > _HEADER - 3 or t.dtype not in _DTYPES:
                raise TypeError(
                    f"a stage boundary carries tensors of at most {_HEADER - 3} dims in "
                    f"{[str(d) for d in _DTYPES]}; got {t.dtype} {tuple(t.shape)}"
                )
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0], header[1], header[2] = len(tensors), t.dim(), _DTYPES.index(t.dtype)
            header[3 : 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            header = header.to(t.device)
            nbytes = t.numel() * t.element_size()
            setattr(self.stats, f"bytes_{kind}", getattr(self.stats, f"bytes_{kind}") + nbytes)
            self.stats.bytes_headers += header.numel() * 8
            tag = 2 * (slot * _MAX_TUPLE + i)
            works += [
                dist.isend(header, dst, group=self.group, tag=tag),
                dist.isend(t, dst, group=self.group, tag=tag + 1),
            ]
        return works

    def _recv(self, stage: int, slot: int):
        """A message from `stage`: a tensor, or the tuple its first header announces."""
        tensors, count, i = [], 1, 0
        while i < count:
            tag = 2 * (slot * _MAX_TUPLE + i)
            header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            dist.recv(header, self._global(stage), group=self.group, tag=tag)
            h = header.tolist()
            count = h[0]
            t = torch.empty(h[3 : 3 + h[1]], dtype=_DTYPES[h[2]], device=self.device)
            dist.recv(t, self._global(stage), group=self.group, tag=tag + 1)
            tensors.append(t)
            i += 1
        return tuple(tensors) if count > 1 else tensors[0]

    # ------------------------------------------------------------ per-stage costs (no communication)
    def profile(self, inputs, targets, repeats: int = 5) -> dict:
        """This stage's compute per microbatch, alone (median seconds over `repeats`): its forward
        and its backward in this schedule (DFA: the stage's projection and weight gradients, and on
        the last stage "error_s", the loss and the head's backward; BP: autograd's backward of the
        stage, the loss included on the last). The stage's input is made locally by the earlier stages'
        modules (every rank holds the whole model), so no rank waits for another."""
        x, t = self._split(inputs, "inputs")[0], self._split(targets, "targets")[0]
        self._batch_rows = _rows(targets)
        dfa = self.parts.dfa
        self._start = time.perf_counter()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for module in self.modules[: self.rank]:
                x = module(x)
            dfa.discard_points()
        e = None
        if self.schedule == "dfa" and not self.last:  # an error of y's shape (its values do not matter)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                y = x
                for module in self.modules[self.rank :]:
                    y = module(y)
            dfa.discard_points()
            e = torch.randn_like(y)
        forward, backward, error = [], [], []
        for _ in range(repeats):
            tic = time.perf_counter()
            if self.schedule == "dfa":
                out, recs = self._forward(x, 0)
                mid = time.perf_counter()
                if self.last:
                    _, e = self._error(out, t, 0)
                    error.append(time.perf_counter() - mid)
                    mid = time.perf_counter()
                    self._backward(recs, out, e, 0)
                else:
                    self._backward(recs, None, e, 0)
            else:
                xs = x if isinstance(x, tuple) else (x,)
                out = self.module(*(t.detach().requires_grad_(t.is_floating_point()) for t in xs))
                mid = time.perf_counter()
                if self.last:
                    self._weighted_loss(out, t).backward()
                else:
                    outs = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])
            forward.append(mid - tic)
            backward.append(time.perf_counter() - mid)
            for p in self.parameters():
                p.grad = None
        self.stats = StepStats()
        return {
            "forward_s": float(torch.tensor(forward).median()),
            "backward_s": float(torch.tensor(backward).median()),
            "error_s": float(torch.tensor(error).median()) if error else 0.0,
        }

    # ------------------------------------------------------------ across stages
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model's gradients (every stage's, one
        all-reduce of the squared norms); returns the total norm."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sq = torch.zeros(1, device=self.device, dtype=torch.float32)
        if grads:
            sq += torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        total = sq.sqrt()[0]
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def synchronize(self) -> None:
        """Every stage's parameters and buffers broadcast from the rank that trains them, so each rank
        holds the whole trained model (for evaluation and checkpoints)."""
        for s, owned in enumerate(self._owners):
            for t in owned.values():
                dist.broadcast(t.data, self._global(s), group=self.group)

    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The whole model's optimizer state dict (each rank holds its stage's entries; merged)."""
        state = optimizer.state_dict()
        parts = [None] * self.stages
        dist.all_gather_object(parts, state["state"], group=self.group)
        merged = {}
        for p in parts:
            merged.update(p)
        return {**state, "state": merged}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a gathered state, keeping only this stage's parameters' entries (the others'
        would be stepped by no one, but would hold memory)."""
        index = [p for g in optimizer.param_groups for p in g["params"]]
        mine = {id(p) for p in self.parameters()}
        state = {**state, "state": {k: v for k, v in state["state"].items() if id(index[int(k)]) in mine}}
        optimizer.load_state_dict(state)


@dataclasses.dataclass
class _Skip:
    """Stage 0's skip branch output of one microbatch, kept for its backward (from e)."""

    tensor: torch.Tensor


def _detached(message):
    """What a stage sends: its output (a tensor or a tuple) without autograd graph."""
    return tuple(t.detach() for t in message) if isinstance(message, tuple) else message.detach()


class _Inbox:
    """The messages of `slots` from one stage, received in order on a thread, so that the step can
    ask which have arrived without blocking (gloo's irecv reports completion only from wait())."""

    def __init__(self, pipe: Pipeline, stage: int, slots, arrived: threading.Condition):
        self.items: dict = {}
        self.error: Exception | None = None
        self.arrived, self.first = arrived, slots[0]
        device = pipe.device
        thread = threading.Thread(target=self._run, args=(pipe, stage, list(slots), device), daemon=True)
        thread.start()

    def _run(self, pipe, stage, slots, device) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            for slot in slots:
                t = pipe._recv(stage, slot)
                with self.arrived:
                    self.items[slot - self.first] = t
                    self.arrived.notify_all()
        except Exception as err:  # noqa: BLE001 - re-raised in the step, which would otherwise wait forever
            with self.arrived:
                self.error = err
                self.arrived.notify_all()

    def has(self, index: int) -> bool:
        if self.error is not None:
            raise RuntimeError(f"receiving from another stage failed: {self.error}") from self.error
        return index in self.items

    def take(self, index: int) -> torch.Tensor:
        return self.items.pop(index)


def _rows(batch) -> int:
    """The row count of a tensor or of a tuple of tensors."""
    return (batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0]


def _to(inputs, device: torch.device):
    """A tensor, or a tuple of tensors (a model's several inputs), on `device`."""
    if isinstance(inputs, (tuple, list)):
        return tuple(t.to(device) for t in inputs)
    return inputs.to(device)


def _device_of(parts: Parts) -> torch.device:
    for module in parts.blocks:
        for p in module.parameters():
            return p.device
    return torch.device("cpu")
