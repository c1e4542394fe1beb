"""Projection microbenchmark: each backend x storage x distribution vs torch.mm(e, B) (cuBLAS / CPU BLAS).

Shapes follow the zoo: recommender (out_features 1: an outer product, memory bound), NeRF (4),
graph (7), LM with the error taken before (512) or after (50257) the vocabulary projection; plus
a sweep of N at a memory-bound and a compute-bound shape, and ``project_points`` (every point's
output in one launch, the activation derivative fused) against its unfused equivalent (one
``project`` with per-column scales, then slicing and the activation's backward in torch) for the
three shape classes. The baseline is ``torch.mm(e * scale, B)`` (the scale folded into e) on a stored B of the
input dtype, eager, measured in the same run.

Rates are reported as a share of the device's peak: GB/s of HBM for out_features <= 16 (memory
bound), else TFLOP/s of the dtype's tensor-core peak (fp32 inputs: TF32's; fp32 rows also give the
share of the CUDA cores' fp32 peak, which cuBLAS's fp32 GEMM runs on by default). The fastest
backend per (op, storage, shape class) is written to ``dfa_kernels/backend_tables/<device>.json``,
which ``backend="auto"`` reads.

Work is done in priority order (uniform B at every shape and project_points, the same in a
second dtype, the N sweeps, then the other distributions) and stops at a deadline: what was not
measured is listed under "skipped", what raised under "failed" (the run goes on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import traceback
from pathlib import Path

import torch

from .. import FeedbackSpec, available_backends, ops, project, reference
from ..ops import BACKEND_TABLES, cached_matrix, device_slug, project_points, shape_class
from .common import (
    DTYPE_KEYS,
    Deadline,
    device_peak,
    environment,
    statistic,
    time_ms,
    time_pair_ms,
    tqdm,
    write_results,
)

# name -> (N, out_features, D) per device type
SHAPES = {
    "cpu": {
        "recsys": (8192, 1, 2048),
        "nerf": (8192, 4, 2304),
        "graph": (2708, 7, 1024),
        "mlp": (256, 10, 8192),  # the default MLP step's error (bench.step's mlp at the cpu size)
        "lm512": (1024, 512, 4096),
        "lm50257": (256, 50257, 1024),
    },
    "cuda": {
        "recsys": (65536, 1, 4096),
        "nerf": (65536, 4, 2304),
        "graph": (2708, 7, 4096),
        "lm512": (8192, 512, 9216),
        "lm50257": (8192, 50257, 9216),
    },
    "tiny": {"recsys": (64, 1, 96), "graph": (48, 7, 64), "lm512": (32, 40, 64), "lm50257": (8, 1030, 32)},
}
QUICK = ("recsys", "graph", "lm512")
# N sweep: shape -> Ns, per device type (out_features and D from SHAPES)
SWEEP = {
    "cpu": {"recsys": (1024, 4096, 16384), "lm512": (256, 1024, 4096)},
    "cuda": {"recsys": (4096, 16384, 65536, 262144), "lm512": (1024, 4096, 16384, 65536)},
    "tiny": {"recsys": (16, 64), "lm512": (16, 32)},
}
# project_points, one case per shape class: (N, out_features, point widths, activation per point)
_LM_ACTS = ("none", "gelu", "none")  # micro placement: attention output, FFN hidden (GELU), block output
POINTS = {
    "cpu": {
        "narrow": (8192, 1, (512,) * 4, ("relu",) * 4),
        "medium": (1024, 256, (256, 1024, 256) * 2, _LM_ACTS * 2),
        "wide": (256, 4096, (256, 1024, 256) * 2, _LM_ACTS * 2),
    },
    "cuda": {
        "narrow": (65536, 1, (1024,) * 4, ("relu",) * 4),  # recommender MLP
        "medium": (8192, 768, (768, 3072, 768) * 12, _LM_ACTS * 12),  # GPT-2 small, micro, error at hidden
        "wide": (4096, 50257, (768, 3072, 768) * 2, _LM_ACTS * 2),
    },  # error after a 50257 vocabulary
    "tiny": {
        "narrow": (32, 1, (24, 9), ("relu", "relu")),
        "medium": (16, 20, (8, 24, 8), _LM_ACTS),
        "wide": (8, 1030, (8, 24, 8), _LM_ACTS),
    },
}
QUICK_POINTS = ("narrow", "medium")
DISTRIBUTIONS = ("uniform", "rademacher", "gaussian", "sparse")
DEFAULT_DTYPES = {"cuda": ("bfloat16", "float32"), "cpu": ("float32",)}
# Speed targets (GPU, where the device's peak is known), checked on the non-sweep rows of the first
# dtype: a memory-bound projection with virtual B at >= 85% of HBM bandwidth; a compute-bound one
# with virtual B at >= 0.9x cuBLAS for Rademacher B (32 entries per hash) and >= 0.7x for uniform B.
TARGETS = {"narrow_pct_hbm": 85.0, "virtual_vs_mm": {"rademacher": 0.9, "uniform": 0.7}}
# CPU (every instruction-set path): the C++ projection, stored and virtual uniform B, against
# torch.mm in the same run: >= 0.9x on every shape, >= 1.5x on the narrow ones (out_features <= 16).
CPU_TARGETS = {"vs_mm": 0.9, "narrow_vs_mm": 1.5}
# GPU timing: batches of >= 30 ms, median of 7 (CPU: 50 ms, minimum of 10; see common.statistic)
TIMING = {
    "cuda": dict(warmup=3, repeats=7, min_time_s=0.03),
    "cpu": dict(warmup=3, repeats=10, min_time_s=0.05),
    "tiny": dict(warmup=1, repeats=1, min_time_s=0.0),
}


def _bytes(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _rates(N, K, D, ms, dtype, B_bytes):
    """(TFLOP/s, GB/s): 2NKD flops; e read, F written, B read when stored (B_bytes per entry, else 0)."""
    es = _bytes(dtype)
    return 2.0 * N * K * D / ms / 1e9, (N * K * es + N * D * es + K * D * B_bytes) / ms / 1e6


def _compiled_backends(device) -> list[str]:
    """Timed: the compiled kernels (Triton only on a GPU: on a CPU it is the interpreter, a
    correctness tool) and, for stored B, the torch reference (a plain GEMM on the cached B).
    Not timed: the torch reference with virtual B (it rebuilds B from the int64 hash every call)."""
    return [b for b in available_backends(device) if not (b == "triton" and device.type == "cpu")]


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: the op on one shape, dtype, backend, storage and distribution. The suite
    (``dfa-kernels bench``) and the pytest-benchmark microbenchmarks (``benchmarks/``) run the same
    list, from :func:`cases`."""

    op: str  # "project" | "project_points"
    shape: str  # a key of SHAPES (project) or POINTS (project_points)
    N: int
    out_features: int
    widths: tuple[int, ...]  # (D,) for project; every point's width for project_points
    activations: tuple[str, ...] | None  # project_points: one per point
    dtype: str
    backend: str
    storage: str
    distribution: str = "uniform"
    sweep: bool = False

    @property
    def id(self) -> str:
        shape = f"{self.shape}-N{self.N}" if self.sweep else self.shape
        return f"{self.op}-{shape}-{self.dtype}-{self.backend}-{self.storage}-{self.distribution}"


def backend_storages(backend: str) -> tuple[str, ...]:
    """Storages timed for a backend: the torch reference only with a stored B (with virtual B it
    generates B from the int64 hash, a correctness tool)."""
    return ("materialized",) if backend == "torch" else ("materialized", "virtual")


def cases(size: str, backends, dtypes, quick: bool = False) -> list[Case]:
    """Every case of the suite in priority order: uniform B at every shape and project_points in
    the first dtype (the backend table's basis), the medium project_points and every shape in the
    other dtypes (the LM's error is fp32 under bf16 autocast), the N sweeps, then the other
    distributions. quick: three shapes, uniform B, no sweeps."""
    shapes = {k: v for k, v in SHAPES[size].items() if not quick or k in QUICK}
    points = {k: v for k, v in POINTS[size].items() if not quick or k in QUICK_POINTS}
    dtypes = [_dtname(d) for d in dtypes]
    first, rest = dtypes[0], dtypes[1:]
    found = []

    def uniform(dt, classes):
        for name, (N, K, D) in shapes.items():
            for b in backends:
                for storage in backend_storages(b):
                    found.append(Case("project", name, N, K, (D,), None, dt, b, storage))
        for cls, (N, K, widths, acts) in points.items():
            if cls in classes:
                for b in backends:
                    for storage in backend_storages(b):
                        found.append(Case("project_points", cls, N, K, tuple(widths), tuple(acts), dt, b, storage))

    uniform(first, tuple(points))
    for dt in rest:
        uniform(dt, ("medium",))
    for name, Ns in SWEEP[size].items() if not quick else ():
        _, K, D = SHAPES[size][name]
        for N in Ns:
            for b in backends:
                for storage in backend_storages(b):
                    found.append(Case("project", name, N, K, (D,), None, first, b, storage, sweep=True))
    for dist in DISTRIBUTIONS[1:] if not quick else ():
        for name, (N, K, D) in shapes.items():
            for b in backends:
                if b != "torch":
                    found.append(Case("project", name, N, K, (D,), None, first, b, "virtual", dist))
    return found


class Inputs:
    """The tensors of a case (seeded), its callable and its baseline: for project,
    ``torch.mm(e * scale, B)`` on a stored B of e's dtype; for project_points, one
    project with per-column scales, the slices and autograd's activation backward in torch."""

    def __init__(self, case: Case, device):
        self.case, self.device = case, torch.device(device)
        dt = getattr(torch, case.dtype)
        g = torch.Generator(device=self.device).manual_seed(0)
        self.e = torch.randn(case.N, case.out_features, generator=g, device=self.device, dtype=dt)
        if case.op == "project":
            self.spec = FeedbackSpec(case.out_features, list(case.widths), distribution=case.distribution)
            return
        self.spec = FeedbackSpec(case.out_features, list(case.widths), distribution=case.distribution)
        self.pre = [
            torch.randn(case.N, w, generator=g, device=self.device, dtype=dt) if a != "none" else None
            for w, a in zip(case.widths, case.activations)
        ]
        self.post = [None if a == "none" else reference.activation(p, a) for p, a in zip(self.pre, case.activations)]
        self.scales = self.spec.scales()
        self.col_scale = torch.cat(
            [torch.full((w,), s, dtype=torch.float32, device=self.device) for s, w in zip(self.scales, case.widths)]
        )

    def fn(self):
        """The measured call."""
        c, e, spec = self.case, self.e, self.spec
        if c.op == "project":
            return lambda: project(e, spec, c.storage, c.backend, scale=0.5)
        return lambda: project_points(
            e, spec, c.storage, c.backend, scales=self.scales, act_inputs=self.pre, activations=list(c.activations)
        )

    def baseline(self):
        """What the measured call is compared with (ratio = baseline time / its time)."""
        c, e, spec = self.case, self.e, self.spec
        if c.op == "project":
            B = cached_matrix(
                FeedbackSpec(c.out_features, list(c.widths)),
                self.device,
                "torch" if c.backend == "torch" else c.backend,
            ).to(e.dtype)
            return lambda: torch.mm(e * 0.5, B)  # the cheapest torch form: the scale folded into e

        def unfused():  # what DFA's plain points cost: one projection, slices, autograd's activation backward
            F_all = project(e, spec, c.storage, c.backend, col_scale=self.col_scale)
            return [
                _activation_backward(F_all[:, o : o + w], a, y, act)
                for o, w, a, y, act in zip(spec.offsets, c.widths, self.pre, self.post, c.activations)
            ]

        return unfused

    def rates(self, ms: float) -> tuple[float, float]:
        """(TFLOP/s, GB/s) of the measured call taking `ms`: 2NKD flops (D the union of the
        columns: one product for points that share them); e read, the outputs written, a stored B
        read (fp32 or e's dtype: ops.stored_dtype), pre-activations read."""
        c = self.case
        D = self.spec.total_width
        es = _bytes(self.e.dtype)
        b_bytes = _bytes(ops.stored_dtype(self.e, c.backend)) if c.storage == "materialized" else 0
        tf, gb = _rates(c.N, c.out_features, D, ms, self.e.dtype, b_bytes)
        if c.op == "project_points":
            gb += (
                (
                    sum(c.N * w * es for w in c.widths)
                    - c.N * D * es
                    + sum(c.N * w * es for w, a in zip(c.widths, c.activations) if a != "none")
                )
                / ms
                / 1e6
            )
        return tf, gb


class _Run:
    def __init__(self, device, deadline: Deadline, quick: bool, progress: bool, size: str):
        self.device, self.deadline, self.quick, self.progress, self.size = device, deadline, quick, progress, size
        self.timing = TIMING[size]
        self.backends = _compiled_backends(device)
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.baselines: dict = {}

    def time(self, fn) -> float:
        return time_ms(fn, self.device, **self.timing)

    def time_pair(self, baseline, fn) -> tuple[float, float]:
        return time_pair_ms(baseline, fn, self.device, **self.timing)

    @staticmethod
    def common(case: Case) -> dict:
        K = case.out_features
        D = case.widths[0] if case.op == "project" else FeedbackSpec(K, list(case.widths)).total_width
        shape = case.shape if case.op == "project" else f"points_{case.shape}"
        return {
            "shape": shape,
            "N": case.N,
            "out_features": K,
            "D": D,
            "dtype": case.dtype,
            "sweep": case.sweep,
            "bound": "memory" if K <= 16 else "compute",
            "shape_class": shape_class(K),
        }

    def run_case(self, case: Case) -> None:
        inputs = Inputs(case, self.device)
        if case.op == "project":
            # every row's ratio from its own interleaved samples of the baseline (time_pair_ms)
            mm_ms, ms = self.time_pair(inputs.baseline(), inputs.fn())
            key = (case.shape, case.N, case.out_features, case.widths, case.dtype, case.sweep)
            if key not in self.baselines:  # one torch.mm row per shape and dtype
                self.baselines[key] = mm_ms
                tf, gb = _rates(
                    case.N, case.out_features, case.widths[0], mm_ms, inputs.e.dtype, _bytes(inputs.e.dtype)
                )
                self.rows.append(
                    {
                        **self.common(case),
                        "impl": "torch.mm",
                        "op": "project",
                        "storage": "materialized",
                        "distribution": "uniform",
                        "ms": mm_ms,
                        "tflops": tf,
                        "gbps": gb,
                        "ratio_vs_mm": 1.0,
                    }
                )
            tf, gb = inputs.rates(ms)
            self.rows.append(
                {
                    **self.common(case),
                    "impl": case.backend,
                    "op": "project",
                    "storage": case.storage,
                    "distribution": case.distribution,
                    "ms": ms,
                    "mm_ms": mm_ms,
                    "tflops": tf,
                    "gbps": gb,
                    "ratio_vs_mm": mm_ms / ms,
                }
            )
            return
        t_unfused, t_fused = self.time_pair(inputs.baseline(), inputs.fn())
        tf, gb = inputs.rates(t_fused)
        self.rows.append(
            {
                **self.common(case),
                "points": len(case.widths),
                "activations": sorted(set(case.activations)),
                "impl": case.backend,
                "op": "project_points",
                "storage": case.storage,
                "distribution": case.distribution,
                "ms": t_fused,
                "unfused_ms": t_unfused,
                "tflops": tf,
                "gbps": gb,
                "ratio_vs_unfused": t_unfused / t_fused,
            }
        )

    def jobs(self, dtypes):
        """(description, callable) for every case, in cases()' priority order."""
        return [
            (case.id, lambda case=case: self.run_case(case))
            for case in cases(self.size, self.backends, dtypes, self.quick)
        ]


def _dtname(dt) -> str:
    return str(dt).removeprefix("torch.")


def _activation_backward(g, a, y, act):
    """What autograd runs for the activation after a plain point (g: the point's slice of F)."""
    if act == "none":
        return g
    if act == "relu":
        return torch.ops.aten.threshold_backward(g, y, 0)
    if act == "gelu":
        return torch.ops.aten.gelu_backward(g, a)
    if act == "tanh":
        return torch.ops.aten.tanh_backward(g, y)
    if act == "sigmoid":
        return torch.ops.aten.sigmoid_backward(g, y)
    return torch.ops.aten.silu_backward(g, a)


def run(
    device="cpu",
    dtype: str | None = None,
    quick=False,
    out: Path | None = None,
    progress=True,
    write_table: bool | None = None,
    time_budget_s: float | None = None,
    dtypes=None,
    size: str | None = None,
) -> dict:
    """Measure; write the results JSON to `out` and (unless quick or tiny, or write_table=False)
    the backend table. `dtype` (one) or `dtypes` (several, the first gets the full plan); default:
    bf16 then fp32 on a GPU, fp32 on a CPU. `time_budget_s`: stop starting new measurements after
    this long. `size`: "cpu" | "cuda" (default: the device's) | "tiny" (smoke tests)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = [dtype] if dtype else list(dtypes or DEFAULT_DTYPES[device.type])
    dts = [getattr(torch, n) for n in names]
    size = size or device.type
    state = _Run(device, Deadline(time_budget_s), quick, progress, size)
    env = environment(device)
    peak = device_peak(device)
    result = {
        "benchmark": "bench_projection",
        "environment": env,
        "dtype": names[0],
        "dtypes": names,
        "quick": quick,
        "size": size,
        "peak": peak,
        "timing": state.timing,
        "statistic": statistic(state.device),
        "backends": state.backends,
        "note": "ratio_vs_mm > 1: faster than torch.mm(e * scale, B) on a stored B of e's dtype; "
        "ratio_vs_unfused > 1: project_points faster than project + slicing + activation backward",
        "rows": state.rows,
        "skipped": state.skipped,
        "failed": state.failed,
    }
    jobs = state.jobs(dts)
    bar = tqdm(jobs, desc="bench_projection", disable=not progress, mininterval=1.0)
    for desc, fn in bar:
        if state.deadline.passed():
            state.skipped.append(desc)
            continue
        bar.set_postfix_str(desc[:60], refresh=False)
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - reported (traceback on stderr); the other cases still run
            traceback.print_exc()
            state.failed.append(f"{desc}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if out is not None:  # as it goes, so a run killed from outside keeps what it measured
            write_results(Path(out), result)
    _add_peaks(state.rows, peak)
    result["targets"] = targets(state.rows, peak, names[0], device.type)
    if out is not None:
        write_results(Path(out), result)
    if write_table if write_table is not None else not (quick or size == "tiny"):
        result["backend_table"] = str(write_backend_table(state.rows, device, env))
        if out is not None:
            write_results(Path(out), result)
    return result


def _add_peaks(rows, peak) -> None:
    for r in rows:
        if not peak:
            r["pct_peak"] = None
            continue
        r["pct_peak_flops"] = 100 * r["tflops"] / peak["tflops"][DTYPE_KEYS[r["dtype"]]]
        if r["dtype"] == "float32":
            r["pct_peak_fp32_cuda_cores"] = 100 * r["tflops"] / peak["tflops"]["fp32"]
        r["pct_peak_bw"] = 100 * r["gbps"] / peak["gbps"]
        r["pct_peak"] = r["pct_peak_bw"] if r["bound"] == "memory" else r["pct_peak_flops"]


def cpu_targets(rows, dtype: str) -> list[dict]:
    """The C++ projection against torch.mm, per non-sweep shape of `dtype` and storage (uniform B)."""
    found = []
    for r in rows:
        if (
            r["op"] == "project"
            and not r["sweep"]
            and r["dtype"] == dtype
            and r["impl"] == "cpu"
            and r["distribution"] == "uniform"
        ):
            bar = CPU_TARGETS["narrow_vs_mm"] if r["out_features"] <= 16 else CPU_TARGETS["vs_mm"]
            found.append(
                {
                    "name": f"{r['shape']}: {r['storage']} B vs torch.mm",
                    "value": r["ratio_vs_mm"],
                    "target": f">= {bar}x",
                    "backend": "cpu",
                    "met": r["ratio_vs_mm"] >= bar,
                }
            )
    return found


def targets(rows, peak, dtype: str, device_type: str = "cuda") -> list[dict]:
    """The projection's speed targets, met or not, per non-sweep shape of `dtype` (a GPU with a
    known peak, or the CPU's against torch.mm)."""
    if device_type == "cpu":
        return cpu_targets(rows, dtype)
    if not peak:
        return []
    found = []
    main = [
        r
        for r in rows
        if r["op"] == "project"
        and not r["sweep"]
        and r["dtype"] == dtype
        and r["impl"] != "torch.mm"
        and r["storage"] == "virtual"
    ]
    for shape in dict.fromkeys(r["shape"] for r in main):
        mine = [r for r in main if r["shape"] == shape]
        if mine[0]["bound"] == "memory":
            best = max(
                (r for r in mine if r["distribution"] == "uniform"), key=lambda r: r["pct_peak_bw"], default=None
            )
            if best:
                found.append(
                    {
                        "name": f"{shape}: virtual B, % of HBM bandwidth",
                        "value": best["pct_peak_bw"],
                        "target": f">= {TARGETS['narrow_pct_hbm']:.0f}%",
                        "backend": best["impl"],
                        "met": best["pct_peak_bw"] >= TARGETS["narrow_pct_hbm"],
                    }
                )
            continue
        for dist, bar in TARGETS["virtual_vs_mm"].items():
            best = max((r for r in mine if r["distribution"] == dist), key=lambda r: r["ratio_vs_mm"], default=None)
            if best:
                found.append(
                    {
                        "name": f"{shape}: virtual {dist} B vs cuBLAS",
                        "value": best["ratio_vs_mm"],
                        "target": f">= {bar}x",
                        "backend": best["impl"],
                        "met": best["ratio_vs_mm"] >= bar,
                    }
                )
    return found


def write_backend_table(rows: list[dict], device, env: dict, directory: Path | None = None) -> Path:
    """The fastest backend per (op, storage, shape class), and the faster storage per (op, shape
    class), from the uniform-B rows.

    A backend's score for a key is the geometric mean, over the cases (shape, N, dtype) measured
    for every candidate, of its time over the best time of that case: each case counts the same.
    """
    cases: dict = {}
    for r in rows:
        if r["impl"] == "torch.mm" or r["distribution"] != "uniform":
            continue
        key = f"{r['op']}|{r['storage']}|{r['shape_class']}"
        case = f"{r['shape']} N={r['N']} K={r['out_features']} D={r['D']} {r['dtype']}"
        cases.setdefault(key, {}).setdefault(r["impl"], {})[case] = r["ms"]
    choices, times, scores = {}, {}, {}
    for key, by_backend in sorted(cases.items()):
        common = set.intersection(*(set(t) for t in by_backend.values()))
        if not common:  # a skipped measurement left no case in common: use each backend's own cases
            common = set().union(*(set(t) for t in by_backend.values()))
        best = {c: min(t[c] for t in by_backend.values() if c in t) for c in common}
        score = {
            b: math.exp(sum(math.log(t[c] / best[c]) for c in common if c in t) / max(1, sum(c in t for c in common)))
            for b, t in by_backend.items()
        }
        choices[key] = min(score, key=score.get)
        times[key], scores[key] = by_backend, score
    # storage="auto" below 64 MiB: the storage whose best backend is faster, per (op, shape class),
    # by the same score over the cases both storages measured
    for op, cls in sorted({tuple(k.split("|")[::2]) for k in cases}):
        best = {}  # storage -> {case: the best backend's time}
        for storage in ("materialized", "virtual"):
            for t in cases.get(f"{op}|{storage}|{cls}", {}).values():
                for case, ms in t.items():
                    best.setdefault(storage, {})[case] = min(ms, best.get(storage, {}).get(case, math.inf))
        if len(best) == 2 and (common := set(best["materialized"]) & set(best["virtual"])):
            score = {
                st: math.exp(
                    sum(math.log(t[c] / min(best["materialized"][c], best["virtual"][c])) for c in common) / len(common)
                )
                for st, t in best.items()
            }
            choices[f"storage|{op}|{cls}"] = min(score, key=score.get)
            scores[f"storage|{op}|{cls}"] = score
    path = Path(directory or BACKEND_TABLES) / f"{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "device": env["device"],
                "git_sha": env["git_sha"],
                "date": env["date"],
                "choices": choices,
                "times_ms": times,
                "score": {k: {b: round(s, 4) for b, s in v.items()} for k, v in scores.items()},
                "note": "choices: the lowest geometric mean of time / best time over the cases "
                "in times_ms (uniform B); storage|<op>|<class>: the storage whose "
                "best backend scores lower (storage='auto'); written by "
                "benchmarks/bench_projection.py",
            },
            indent=2,
        )
        + "\n"
    )
    ops.backend_table.cache_clear()  # backend="auto" in this process sees the new table
    return path


def print_table(res: dict) -> None:
    print(
        f"{'shape':<14}{'N':>7}{'dtype':>9}{'impl':>9}{'storage':>13}{'dist':>11}{'ms':>9}{'TFLOP/s':>9}"
        f"{'GB/s':>8}{'%peak':>7}{'ratio':>7}"
    )
    for r in res["rows"]:
        pct = r.get("pct_peak")
        ratio = r.get("ratio_vs_mm", r.get("ratio_vs_unfused"))
        print(
            f"{r['shape']:<14}{r['N']:>7}{r['dtype']:>9}{r['impl']:>9}{r['storage']:>13}{r['distribution']:>11}"
            f"{r['ms']:>9.3f}{r['tflops']:>9.3f}{r['gbps']:>8.1f}{'' if pct is None else f'{pct:.1f}':>7}"
            f"{ratio:>7.2f}"
        )
    print(
        "ratio: vs torch.mm(e * scale, B) (project rows), vs project + slice + activation backward "
        "in torch (project_points rows)"
    )
    for t in res.get("targets", []):
        print(
            f"target {t['name']}: {t['value']:.2f} ({t['backend']}), {t['target']}: {'met' if t['met'] else 'NOT met'}"
        )
    if res["skipped"]:
        print(f"skipped (time budget): {len(res['skipped'])} measurements, from {res['skipped'][0]!r}")
    for line in res.get("failed", []):
        print(f"FAILED {line}")
    if "backend_table" in res:
        print(f"backend table: {res['backend_table']}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="one dtype (default: bfloat16 then float32 on CUDA, float32 on CPU)")
    p.add_argument("--quick", action="store_true", help="three shapes, uniform B, no sweeps; no backend table")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later measurements are skipped")
    p.add_argument("--no-table", action="store_true", help="do not write dfa_kernels/backend_tables/<device>.json")
    p.add_argument(
        "--size",
        choices=["cpu", "cuda", "tiny"],
        default=None,
        help="shapes (default: the device's; tiny for smoke tests)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    res = run(
        a.device,
        a.dtype,
        a.quick,
        a.out,
        progress=not a.no_progress,
        write_table=False if a.no_table else None,
        time_budget_s=a.time_budget,
        size=a.size,
    )
    print_table(res)
    return res


if __name__ == "__main__":
    main()
