"""An event-driven model of one pipeline step: DFA's schedule, GPipe and 1F1B.

Assumptions (each a parameter or stated here):
- a stage is one sequential worker; its forward and backward of one microbatch take the measured
  per-stage times (:meth:`~.engine.Pipeline.profile`), the same for every microbatch;
- a message of n bytes from stage a reaches its destination ``latency + n / bandwidth`` after it
  is sent; a stage's sends leave one after another over its one link (the last stage's S-1 error
  sends are serialised), receiving costs no compute;
- ``cores``: with more busy stages than cores, they share the cores equally (processor sharing):
  the CPU runs of 4 processes on 2 cores; None: every stage has its own device;
- the step ends when every stage has done its backwards and its optimizer step.
Orders: GPipe runs all forwards, then all backwards in microbatch order; 1F1B runs S-1-s warm-up
forwards, then one forward and one backward, then the remaining backwards (torch's Schedule1F1B);
DFA runs the next forward as soon as its input is there, otherwise the oldest backward whose error
has arrived (the engine's own rule); the last stage computes e after each forward and sends it to
every stage before its own backward.
"""

from __future__ import annotations

import dataclasses
import heapq

SCHEDULES = ("dfa", "gpipe", "1f1b")


@dataclasses.dataclass
class Costs:
    """Per stage, seconds per microbatch: forward; backward (DFA: the stage's own projection and
    weight gradients; BP: autograd's backward, the loss on the last stage); error: DFA's loss and
    head backward on the last stage, before e is sent; optimizer: once per step. Bytes per
    microbatch: the activation crossing each boundary (BP sends its gradient back as well), e."""

    forward: list[float]
    backward: list[float]
    activation_bytes: list[int]
    error_bytes: int = 0
    error: float = 0.0
    optimizer: list[float] | None = None

    def __post_init__(self):
        S = len(self.forward)
        if S < 1 or len(self.backward) != S or len(self.activation_bytes) != S - 1:
            raise ValueError(
                f"Costs: forward and backward need one entry per stage and activation_bytes one per "
                f"boundary; got {len(self.forward)}, {len(self.backward)}, {len(self.activation_bytes)}"
            )
        if self.optimizer is not None and len(self.optimizer) != S:
            raise ValueError(f"Costs: optimizer needs one entry per stage ({S}); got {len(self.optimizer)}")


@dataclasses.dataclass
class Link:
    latency_s: float = 0.0
    bandwidth: float = float("inf")  # bytes per second

    def transfer(self, nbytes: int) -> float:
        return nbytes / self.bandwidth


def _bp_order(schedule: str, s: int, S: int, M: int) -> list[tuple[str, int]]:
    if schedule == "gpipe":
        return [("F", m) for m in range(M)] + [("B", m) for m in range(M)]
    warm = min(S - 1 - s, M)
    order = [("F", m) for m in range(warm)]
    for i in range(M - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", m) for m in range(M - warm, M)]


def simulate(
    schedule: str, costs: Costs, microbatches: int, link: Link | None = None, cores: int | None = None
) -> dict:
    """One step: {"step_s", "busy_s" (per stage), "bubble" (1 - busy / (S * step)), "bytes" sent}."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}; got {schedule!r}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive int; got {microbatches!r}")
    if cores is not None and cores < 1:
        raise ValueError(f"cores must be None or a positive int; got {cores!r}")
    link = link or Link()
    S, M = len(costs.forward), microbatches
    dfa = schedule == "dfa"
    arrived: set = set()  # ("act" | "grad" | "err", stage receiving, m)
    pending: list = []  # a heap of (time, key): messages in flight
    link_free = [0.0] * S
    sent = 0
    forwarded = [set() for _ in range(S)]
    backs = [0] * S  # backwards done (each stage runs them in microbatch order)
    orders = None if dfa else [_bp_order(schedule, s, S, M) for s in range(S)]
    position = [0] * S
    next_forward = [0] * S
    running: list = [None] * S  # [kind, m, remaining seconds of work]
    finish = [0.0] * S
    t = 0.0

    def send(src: int, dst: int, key, nbytes: int) -> None:
        nonlocal sent
        start = max(t, link_free[src])
        link_free[src] = start + link.transfer(nbytes)
        heapq.heappush(pending, (link_free[src] + link.latency_s, key))
        sent += nbytes

    def cost(s: int, kind: str) -> float:
        if kind == "F":
            return costs.forward[s] + (costs.error if dfa and s == S - 1 else 0.0)
        return costs.backward[s]

    def pick(s: int):
        if dfa:
            m = next_forward[s]
            if m < M and (s == 0 or ("act", s, m) in arrived):
                return "F", m
            m = backs[s]
            if m < next_forward[s] and (s == S - 1 or ("err", s, m) in arrived):
                return "B", m
            return None
        if position[s] == len(orders[s]):
            return None
        kind, m = orders[s][position[s]]
        if kind == "F" and (s == 0 or ("act", s, m) in arrived):
            return kind, m
        if kind == "B" and m in forwarded[s] and (s == S - 1 or ("grad", s, m) in arrived):
            return kind, m
        return None

    def complete(s: int, kind: str, m: int) -> None:
        if kind == "F":
            forwarded[s].add(m)
            next_forward[s] = m + 1
            if s < S - 1:
                send(s, s + 1, ("act", s + 1, m), costs.activation_bytes[s])
            elif dfa:
                for d in range(S - 1):
                    send(s, d, ("err", d, m), costs.error_bytes)
        else:
            backs[s] += 1
            if not dfa and s > 0:
                send(s, s - 1, ("grad", s - 1, m), costs.activation_bytes[s - 1])
        if not dfa:
            position[s] += 1
        if backs[s] == M:
            finish[s] = t

    while True:
        for s in range(S):
            if running[s] is None and backs[s] < M:
                op = pick(s)
                if op is not None:
                    running[s] = [op[0], op[1], cost(s, op[0])]
        active = [s for s in range(S) if running[s] is not None]
        if not active and not pending:
            break
        rate = 1.0 if cores is None else min(1.0, cores / max(1, len(active)))
        step = min((running[s][2] / rate for s in active), default=float("inf"))
        arrival = pending[0][0] if pending else float("inf")
        if step == float("inf") and arrival == float("inf"):
            raise RuntimeError("the simulated schedule is stuck (a dependency never arrives)")
        dt = min(step, arrival - t)
        t += max(dt, 0.0)
        for s in active:
            running[s][2] -= rate * max(dt, 0.0)
        while pending and pending[0][0] <= t + 1e-15:
            arrived.add(heapq.heappop(pending)[1])
        for s in active:
            if running[s][2] <= 1e-12:
                kind, m, _ = running[s]
                running[s] = None
                complete(s, kind, m)
    optimizer = costs.optimizer or [0.0] * S
    ends = [f + o for f, o in zip(finish, optimizer)]
    step_s = max(ends)
    busy = [M * (cost(s, "F") + cost(s, "B")) + optimizer[s] for s in range(S)]
    return {"step_s": step_s, "busy_s": busy, "bubble": 1.0 - sum(busy) / (S * step_s), "bytes": sent}


def bytes_per_step(schedule: str, costs: Costs, microbatches: int) -> int:
    """What crosses the stage boundaries in one step: each activation forward, plus (BP) its
    gradient back, or (DFA) e once to each of the S-1 other stages."""
    acts = microbatches * sum(costs.activation_bytes)
    if schedule == "dfa":
        return acts + microbatches * (len(costs.forward) - 1) * costs.error_bytes
    return 2 * acts
