"""Projection microbenchmark: each backend x storage x distribution vs torch.mm(e, B) (cuBLAS / CPU BLAS).

Shapes follow the zoo: recommender (out_features 1: an outer product, memory bound), NeRF (4),
graph (7), LM with the error taken before (512) or after (50257) the vocabulary projection; plus
a sweep of N at a memory-bound and a compute-bound shape, and ``project_points`` (every point's
output in one launch, the activation derivative fused) against its unfused equivalent (one
``project`` with per-column scales, then slicing and the activation's backward in torch) for the
three shape classes. The baseline is ``(torch.mm(e, B) * scale).to(dtype)`` on a stored B of the
input dtype, eager, measured in the same run.

Rates are reported as a share of the device's peak: GB/s of HBM for out_features <= 16 (memory
bound), else TFLOP/s of the dtype's tensor-core peak (fp32 inputs: TF32's; fp32 rows also give
the share of the CUDA cores' fp32 peak, which cuBLAS's fp32 GEMM runs on by default). The fastest backend per (op, storage, shape class) is written
to ``dfa_kernels/backend_tables/<device>.json``, which ``backend="auto"`` reads.

Work is done in priority order (uniform B at every shape and project_points, the same in a
second dtype, the N sweeps, then the other distributions) and stops at a deadline: what was not
measured is listed under "skipped", what raised under "failed" (the run goes on).
"""
from __future__ import annotations

import argparse
import json
import math
import traceback
from pathlib import Path

import torch

from .. import FeedbackSpec, available_backends, ops, project, reference
from ..ops import BACKEND_TABLES, cached_matrix, device_slug, project_points, shape_class
from .common import tqdm, DTYPE_KEYS, Deadline, device_peak, environment, statistic, time_ms, write_results

# name -> (N, out_features, D) per device type
SHAPES = {
    "cpu": {"recsys": (8192, 1, 2048), "nerf": (8192, 4, 2304), "graph": (2708, 7, 1024),
            "lm512": (1024, 512, 4096), "lm50257": (256, 50257, 1024)},
    "cuda": {"recsys": (65536, 1, 4096), "nerf": (65536, 4, 2304), "graph": (2708, 7, 4096),
             "lm512": (8192, 512, 9216), "lm50257": (8192, 50257, 9216)},
    "tiny": {"recsys": (64, 1, 96), "graph": (48, 7, 64), "lm512": (32, 40, 64), "lm50257": (8, 1030, 32)},
}
QUICK = ("recsys", "graph", "lm512")
# N sweep: shape -> Ns, per device type (out_features and D from SHAPES)
SWEEP = {"cpu": {"recsys": (1024, 4096, 16384), "lm512": (256, 1024, 4096)},
         "cuda": {"recsys": (4096, 16384, 65536, 262144), "lm512": (1024, 4096, 16384, 65536)},
         "tiny": {"recsys": (16, 64), "lm512": (16, 32)}}
# project_points, one case per shape class: (N, out_features, point widths, activation per point)
_LM_ACTS = ("none", "gelu", "none")  # micro placement: attention output, FFN hidden (GELU), block output
POINTS = {
    "cpu": {"narrow": (8192, 1, (512,) * 4, ("relu",) * 4),
            "medium": (1024, 256, (256, 1024, 256) * 2, _LM_ACTS * 2),
            "wide": (256, 4096, (256, 1024, 256) * 2, _LM_ACTS * 2)},
    "cuda": {"narrow": (65536, 1, (1024,) * 4, ("relu",) * 4),             # recommender MLP
             "medium": (8192, 768, (768, 3072, 768) * 12, _LM_ACTS * 12),  # GPT-2 small, micro, error at hidden
             "wide": (4096, 50257, (768, 3072, 768) * 2, _LM_ACTS * 2)},   # error after a 50257 vocabulary
    "tiny": {"narrow": (32, 1, (24, 9), ("relu", "relu")), "medium": (16, 20, (8, 24, 8), _LM_ACTS),
             "wide": (8, 1030, (8, 24, 8), _LM_ACTS)},
}
QUICK_POINTS = ("narrow", "medium")
DISTRIBUTIONS = ("uniform", "rademacher", "gaussian", "sparse")
DEFAULT_DTYPES = {"cuda": ("bfloat16", "float32"), "cpu": ("float32",)}
# Speed targets (GPU, where the device's peak is known), checked on the non-sweep rows of the first
# dtype: a memory-bound projection with virtual B at >= 85% of HBM bandwidth; a compute-bound one
# with virtual B at >= 0.9x cuBLAS for Rademacher B (32 entries per hash) and >= 0.7x for uniform B.
TARGETS = {"narrow_pct_hbm": 85.0, "virtual_vs_mm": {"rademacher": 0.9, "uniform": 0.7}}
# GPU timing: batches of >= 30 ms, median of 7 (CPU: 50 ms, minimum of 10; see common.statistic)
TIMING = {"cuda": dict(warmup=3, repeats=7, min_time_s=0.03), "cpu": dict(warmup=3, repeats=10, min_time_s=0.05),
          "tiny": dict(warmup=1, repeats=1, min_time_s=0.0)}


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


class _Run:
    def __init__(self, device, deadline: Deadline, quick: bool, progress: bool, size: str):
        self.device, self.deadline, self.quick, self.progress, self.size = device, deadline, quick, progress, size
        self.timing = TIMING[size]
        self.backends = _compiled_backends(device)
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.baselines: dict = {}
        self.inputs: dict = {}

    def time(self, fn) -> float:
        return time_ms(fn, self.device, **self.timing)

    def storages(self, backend):
        return ("materialized",) if backend == "torch" else ("materialized", "virtual")

    # ------------------------------------------------------------ project
    def _e(self, N, K, dt):
        key = (N, K, dt)
        if key not in self.inputs:
            self.inputs.clear()  # one shape's inputs at a time (the largest is ~1 GB)
            g = torch.Generator(device=self.device).manual_seed(0)
            self.inputs[key] = torch.randn(N, K, generator=g, device=self.device, dtype=dt)
        return self.inputs[key]

    def baseline(self, name, N, K, D, dt, sweep):
        key = (name, N, K, D, dt, sweep)
        if key not in self.baselines:
            e = self._e(N, K, dt)
            B = cached_matrix(FeedbackSpec(K, [D]), self.device, self.backends[0]).to(dt)
            ms = self.time(lambda: (torch.mm(e, B) * 0.5).to(dt))
            del B
            self.baselines[key] = ms
            tf, gb = _rates(N, K, D, ms, dt, _bytes(dt))
            self.rows.append({**self.common(name, N, K, D, dt, sweep), "impl": "torch.mm", "op": "project",
                              "storage": "materialized", "distribution": "uniform", "ms": ms, "tflops": tf,
                              "gbps": gb, "ratio_vs_mm": 1.0})
        return self.baselines[key]

    @staticmethod
    def common(name, N, K, D, dt, sweep):
        return {"shape": name, "N": N, "out_features": K, "D": D, "dtype": _dtname(dt),
                "sweep": sweep, "bound": "memory" if K <= 16 else "compute", "shape_class": shape_class(K)}

    def project_row(self, name, N, K, D, dt, sweep, backend, storage, dist):
        base = self.baseline(name, N, K, D, dt, sweep)
        e = self._e(N, K, dt)
        spec = FeedbackSpec(K, [D], distribution=dist)
        ms = self.time(lambda: project(e, spec, storage, backend, scale=0.5))
        tf, gb = _rates(N, K, D, ms, dt, 4 if storage == "materialized" else 0)  # stored B is fp32
        self.rows.append({**self.common(name, N, K, D, dt, sweep), "impl": backend, "op": "project",
                          "storage": storage, "distribution": dist, "ms": ms, "tflops": tf, "gbps": gb,
                          "ratio_vs_mm": base / ms})

    # ------------------------------------------------------------ project_points
    def points_rows(self, cls, N, K, widths, acts, dt, backend):
        spec = FeedbackSpec(K, widths)
        self.inputs.clear()
        g = torch.Generator(device=self.device).manual_seed(0)
        e = torch.randn(N, K, generator=g, device=self.device, dtype=dt)
        pre = [torch.randn(N, w, generator=g, device=self.device, dtype=dt) if a != "none" else None
               for w, a in zip(widths, acts)]
        outs = [None if a == "none" else reference.activation(p, a) for p, a in zip(pre, acts)]
        scales = spec.scales()
        col_scale = torch.tensor([s for s, w in zip(scales, widths) for _ in range(w)], dtype=torch.float32,
                                 device=self.device)
        D = spec.total_width
        for storage in self.storages(backend):
            def unfused():  # what DFA's plain points cost: one projection, slices, autograd's activation backward
                F_all = project(e, spec, storage, backend, col_scale=col_scale)
                return [_activation_backward(F_all[:, o:o + w], a, y, act)
                        for o, w, a, y, act in zip(spec.offsets, widths, pre, outs, acts)]

            def fused():
                return project_points(e, spec, storage, backend, scales=scales, act_inputs=pre,
                                      activations=list(acts))
            t_fused, t_unfused = self.time(fused), self.time(unfused)
            tf, gb = _rates(N, K, D, t_fused, dt, 4 if storage == "materialized" else 0)
            gb += sum(N * w * _bytes(dt) for w, a in zip(widths, acts) if a != "none") / t_fused / 1e6
            self.rows.append({**self.common(f"points_{cls}", N, K, D, dt, False), "points": len(widths),
                              "activations": sorted(set(acts)), "impl": backend, "op": "project_points",
                              "storage": storage, "distribution": "uniform", "ms": t_fused,
                              "unfused_ms": t_unfused, "tflops": tf, "gbps": gb,
                              "ratio_vs_unfused": t_unfused / t_fused})

    # ------------------------------------------------------------ plan
    def jobs(self, dtypes):
        """(description, callable) in priority order: uniform B at every shape and project_points
        in the first dtype (the backend table's basis), the same in the other dtypes (the LM's error
        is fp32 under bf16 autocast), the N sweeps, then the other distributions."""
        kind = self.size
        shapes = {k: v for k, v in SHAPES[kind].items() if not self.quick or k in QUICK}
        points = {k: v for k, v in POINTS[kind].items() if not self.quick or k in QUICK_POINTS}
        first, rest = dtypes[0], dtypes[1:]
        jobs = []

        def add(desc, fn, *args):
            jobs.append((desc, lambda: fn(*args)))

        def uniform(dt, classes):
            for name, (N, K, D) in shapes.items():
                for b in self.backends:
                    for storage in self.storages(b):
                        add(f"project {name} {_dtname(dt)} {b} {storage} uniform", self.project_row,
                            name, N, K, D, dt, False, b, storage, "uniform")
            for cls, (N, K, widths, acts) in points.items():
                if cls in classes:
                    for b in self.backends:
                        add(f"project_points {cls} {_dtname(dt)} {b}", self.points_rows, cls, N, K, widths, acts, dt, b)

        uniform(first, tuple(points))
        for dt in rest:
            uniform(dt, ("medium",))
        for name, Ns in (SWEEP[kind].items() if not self.quick else ()):
            _, K, D = SHAPES[kind][name]
            for N in Ns:
                for b in self.backends:
                    for storage in self.storages(b):
                        add(f"sweep {name} N={N} {_dtname(first)} {b} {storage}", self.project_row,
                            name, N, K, D, first, True, b, storage, "uniform")
        for dist in DISTRIBUTIONS[1:] if not self.quick else ():
            for name, (N, K, D) in shapes.items():
                for b in self.backends:
                    if b != "torch":
                        add(f"project {name} {_dtname(first)} {b} virtual {dist}", self.project_row,
                            name, N, K, D, first, False, b, "virtual", dist)
        return jobs


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


def run(device="cpu", dtype: str | None = None, quick=False, out: Path | None = None, progress=True,
        write_table: bool | None = None, time_budget_s: float | None = None, dtypes=None,
        size: str | None = None) -> dict:
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
    result = {"benchmark": "bench_projection", "environment": env, "dtype": names[0], "dtypes": names,
              "quick": quick, "size": size, "peak": peak, "timing": state.timing, "statistic": statistic(state.device), "backends": state.backends,
              "note": "ratio_vs_mm > 1: faster than (torch.mm(e, B) * scale).to(dtype) on a stored B of e's dtype; "
                      "ratio_vs_unfused > 1: project_points faster than project + slicing + activation backward",
              "rows": state.rows, "skipped": state.skipped, "failed": state.failed}
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
            state.inputs.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if out is not None:  # as it goes, so a run killed from outside keeps what it measured
            write_results(Path(out), result)
    _add_peaks(state.rows, peak)
    result["targets"] = targets(state.rows, peak, names[0])
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


def targets(rows, peak, dtype: str) -> list[dict]:
    """The projection's speed targets, met or not, per non-sweep shape of `dtype` (GPU only)."""
    if not peak:
        return []
    found = []
    main = [r for r in rows if r["op"] == "project" and not r["sweep"] and r["dtype"] == dtype
            and r["impl"] != "torch.mm" and r["storage"] == "virtual"]
    for shape in dict.fromkeys(r["shape"] for r in main):
        mine = [r for r in main if r["shape"] == shape]
        if mine[0]["bound"] == "memory":
            best = max((r for r in mine if r["distribution"] == "uniform"), key=lambda r: r["pct_peak_bw"], default=None)
            if best:
                found.append({"name": f"{shape}: virtual B, % of HBM bandwidth", "value": best["pct_peak_bw"],
                              "target": f">= {TARGETS['narrow_pct_hbm']:.0f}%", "backend": best["impl"],
                              "met": best["pct_peak_bw"] >= TARGETS["narrow_pct_hbm"]})
            continue
        for dist, bar in TARGETS["virtual_vs_mm"].items():
            best = max((r for r in mine if r["distribution"] == dist), key=lambda r: r["ratio_vs_mm"], default=None)
            if best:
                found.append({"name": f"{shape}: virtual {dist} B vs cuBLAS", "value": best["ratio_vs_mm"],
                              "target": f">= {bar}x", "backend": best["impl"], "met": best["ratio_vs_mm"] >= bar})
    return found


def write_backend_table(rows: list[dict], device, env: dict, directory: Path | None = None) -> Path:
    """The fastest backend per (op, storage, shape class), from the uniform-B rows.

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
        score = {b: math.exp(sum(math.log(t[c] / best[c]) for c in common if c in t) / max(1, sum(c in t for c in common)))
                 for b, t in by_backend.items()}
        choices[key] = min(score, key=score.get)
        times[key], scores[key] = by_backend, score
    path = Path(directory or BACKEND_TABLES) / f"{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": env["device"], "git_sha": env["git_sha"], "date": env["date"],
                                "choices": choices, "times_ms": times,
                                "score": {k: {b: round(s, 4) for b, s in v.items()} for k, v in scores.items()},
                                "note": "choices: the lowest geometric mean of time / best time over the cases "
                                        "in times_ms (uniform B); written by benchmarks/bench_projection.py"},
                               indent=2) + "\n")
    ops.backend_table.cache_clear()  # backend="auto" in this process sees the new table
    return path


def print_table(res: dict) -> None:
    print(f"{'shape':<14}{'N':>7}{'dtype':>9}{'impl':>9}{'storage':>13}{'dist':>11}{'ms':>9}{'TFLOP/s':>9}"
          f"{'GB/s':>8}{'%peak':>7}{'ratio':>7}")
    for r in res["rows"]:
        pct = r.get("pct_peak")
        ratio = r.get("ratio_vs_mm", r.get("ratio_vs_unfused"))
        print(f"{r['shape']:<14}{r['N']:>7}{r['dtype']:>9}{r['impl']:>9}{r['storage']:>13}{r['distribution']:>11}"
              f"{r['ms']:>9.3f}{r['tflops']:>9.3f}{r['gbps']:>8.1f}{'' if pct is None else f'{pct:.1f}':>7}"
              f"{ratio:>7.2f}")
    print("ratio: vs torch.mm(e, B) * scale (project rows), vs project + slice + activation backward "
          "in torch (project_points rows)")
    for t in res.get("targets", []):
        print(f"target {t['name']}: {t['value']:.2f} ({t['backend']}), {t['target']}: {'met' if t['met'] else 'NOT met'}")
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
    p.add_argument("--size", choices=["cpu", "cuda", "tiny"], default=None,
                   help="shapes (default: the device's; tiny for smoke tests)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    res = run(a.device, a.dtype, a.quick, a.out, progress=not a.no_progress,
              write_table=False if a.no_table else None, time_budget_s=a.time_budget, size=a.size)
    print_table(res)
    return res


if __name__ == "__main__":
    main()
