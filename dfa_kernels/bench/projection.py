"""Projection microbenchmark: each backend x storage x distribution vs torch.mm(e, B) (cuBLAS / CPU BLAS).

Shapes follow the zoo: recommender (out_features 1: an outer product, memory bound), NeRF (4),
graph (7), LM with the error taken before (512) or after (50257) the vocabulary projection; plus
a sweep of N at two of them, and project_points (per-point outputs with the activation derivative
fused) against its unfused equivalent (project, then slice, then multiply by f'(a) in torch).
Rates are reported as a share of the device's peak: GB/s of HBM for out_features <= 16 (memory
bound), TFLOP/s of the dtype otherwise. On a GPU the fastest backend per (op, storage, shape
class) is written to dfa_kernels/backend_tables/<device>.json, which backend="auto" reads.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from .. import FeedbackSpec, available_backends, project, reference
from ..ops import BACKEND_TABLES, cached_matrix, device_slug, project_points, shape_class
from .common import device_peak, environment, time_ms, write_results

# name -> (N, out_features, D) per device type
SHAPES = {
    "cpu": {"recsys": (8192, 1, 2048), "nerf": (8192, 4, 2304), "graph": (2708, 7, 1024),
            "lm512": (1024, 512, 4096), "lm50257": (256, 50257, 1024)},
    "cuda": {"recsys": (65536, 1, 4096), "nerf": (65536, 4, 2304), "graph": (2708, 7, 4096),
             "lm512": (8192, 512, 9216), "lm50257": (8192, 50257, 9216)},
}
QUICK = ("recsys", "graph", "lm512")
# N sweep: (shape, Ns) per device type
SWEEP = {"cpu": {"recsys": (1024, 4096, 16384), "lm512": (256, 1024, 4096)},
         "cuda": {"recsys": (4096, 16384, 65536, 262144), "lm512": (1024, 4096, 16384, 65536)}}
# project_points: (N, out_features, point widths) with a GELU on every point
POINTS = {"cpu": (1024, 512, (1024,) * 4), "cuda": (8192, 768, (3072,) * 12)}


def _rates(N, K, D, ms, dtype, materialized):
    es = torch.tensor([], dtype=dtype).element_size()
    flops = 2.0 * N * K * D
    moved = N * K * es + N * D * es + (K * D * 4 if materialized else 0)
    return flops / ms / 1e9, moved / ms / 1e6  # TFLOP/s, GB/s


def run(device="cpu", dtype="float32", quick=False, out: Path | None = None, progress=True,
        write_table: bool = True) -> dict:
    device = torch.device(device)
    dt = getattr(torch, dtype)
    # Timed: the kernels. Not timed: the torch reference (it rebuilds B from the int64 hash on every
    # call) and Triton under the interpreter (a correctness tool).
    backends = [b for b in available_backends(device) if b != "torch" and not (b == "triton" and device.type == "cpu")]
    shapes = {k: v for k, v in SHAPES[device.type].items() if not quick or k in QUICK}
    peak = device_peak(device)
    rows = []
    jobs = [(name, shape, False) for name, shape in shapes.items()]
    if not quick:
        jobs += [(name, (N, *SHAPES[device.type][name][1:]), True)
                 for name, Ns in SWEEP[device.type].items() for N in Ns]
    for name, (N, K, D), sweep in tqdm(jobs, desc="bench_projection", disable=not progress):
        rows += _time_shape(name, N, K, D, sweep, backends, device, dt, quick)
    rows += _time_points(backends, device, dt)
    for r in rows:
        if peak:
            key = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
            r["pct_peak_flops"] = 100 * r["tflops"] / peak["tflops"][key]
            r["pct_peak_bw"] = 100 * r["gbps"] / peak["gbps"]
    result = {"benchmark": "bench_projection", "environment": environment(device), "dtype": dtype,
              "peak": peak, "note": "ratio_vs_mm > 1 means faster than torch.mm(e, B) * scale on a stored B",
              "rows": rows}
    if out is not None:
        write_results(Path(out), result)
    if device.type == "cuda" and write_table:
        result["backend_table"] = str(write_backend_table(rows, device, result["environment"]))
    return result


def _time_shape(name, N, K, D, sweep, backends, device, dt, quick) -> list[dict]:
    torch.manual_seed(0)
    e = torch.randn(N, K, device=device, dtype=dt)
    B = cached_matrix(FeedbackSpec(K, [D]), device, "torch").to(dt)
    baseline = time_ms(lambda: (torch.mm(e, B) * 0.5).to(dt), device)
    common = {"shape": name, "N": N, "out_features": K, "D": D, "sweep": sweep,
              "bound": "memory" if K <= 16 else "compute", "shape_class": shape_class(K)}
    tf, gb = _rates(N, K, D, baseline, dt, True)
    rows = [{**common, "impl": "torch.mm", "op": "project", "storage": "materialized", "distribution": "uniform",
             "ms": baseline, "tflops": tf, "gbps": gb, "ratio_vs_mm": 1.0}]
    all_dists = ("uniform", "rademacher", "gaussian", "sparse")
    for backend in backends:
        for storage, dists in (("materialized", ("uniform",)), ("virtual", ("uniform",) if sweep else all_dists)):
            for dist in dists:
                spec = FeedbackSpec(K, [D], distribution=dist)
                ms = time_ms(lambda: project(e, spec, storage, backend, scale=0.5), device)
                tf, gb = _rates(N, K, D, ms, dt, storage == "materialized")
                rows.append({**common, "impl": backend, "op": "project", "storage": storage, "distribution": dist,
                             "ms": ms, "tflops": tf, "gbps": gb, "ratio_vs_mm": baseline / ms})
    return rows


def _time_points(backends, device, dt) -> list[dict]:
    """project_points with a GELU epilogue vs project + slicing + the derivative in torch."""
    N, K, widths = POINTS[device.type]
    spec = FeedbackSpec(K, widths)
    torch.manual_seed(0)
    e = torch.randn(N, K, device=device, dtype=dt)
    pre = [torch.randn(N, w, device=device, dtype=dt) for w in widths]
    scales = spec.scales()
    rows = []
    for backend in backends:
        for storage in ("materialized", "virtual"):
            def unfused():
                F_all = project(e, spec, storage, backend)
                return [(F_all[:, o:o + w].float() * s * reference.activation_grad(a, "gelu")).to(dt)
                        for o, w, s, a in zip(spec.offsets, widths, scales, pre)]

            def fused():
                return project_points(e, spec, storage, backend, scales=scales, act_inputs=pre,
                                      activations=["gelu"] * len(widths))
            t_unfused, t_fused = time_ms(unfused, device), time_ms(fused, device)
            D = sum(widths)
            tf, gb = _rates(N, K, D, t_fused, dt, storage == "materialized")
            rows.append({"shape": "points_gelu", "N": N, "out_features": K, "D": D, "points": len(widths),
                         "sweep": False, "bound": "memory" if K <= 16 else "compute", "shape_class": shape_class(K),
                         "impl": backend, "op": "project_points", "storage": storage, "distribution": "uniform",
                         "ms": t_fused, "unfused_ms": t_unfused, "tflops": tf, "gbps": gb,
                         "ratio_vs_unfused": t_unfused / t_fused})
    return rows


def write_backend_table(rows: list[dict], device, env: dict) -> Path:
    """The fastest backend per (op, storage, shape class), uniform B, largest N measured."""
    best: dict = {}
    for r in rows:
        if r["impl"] == "torch.mm" or r["distribution"] != "uniform":
            continue
        key = f"{r['op']}|{r['storage']}|{r['shape_class']}"
        best.setdefault(key, {}).setdefault(r["impl"], []).append(r["ms"])
    choices = {k: min(v, key=lambda b: sum(v[b])) for k, v in best.items()}
    path = BACKEND_TABLES / f"{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": env["device"], "git_sha": env["git_sha"], "date": env["date"],
                                "choices": choices, "times_ms": best}, indent=2) + "\n")
    return path


def print_table(res: dict) -> None:
    print(f"{'shape':<12}{'N':>7}{'impl':>10}{'storage':>13}{'dist':>11}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}"
          f"{'%peak':>7}{'ratio':>7}")
    for r in res["rows"]:
        pct = r.get("pct_peak_bw" if r["bound"] == "memory" else "pct_peak_flops")
        ratio = r.get("ratio_vs_mm", r.get("ratio_vs_unfused"))
        print(f"{r['shape']:<12}{r['N']:>7}{r['impl']:>10}{r['storage']:>13}{r['distribution']:>11}{r['ms']:>9.3f}"
              f"{r['tflops']:>9.3f}{r['gbps']:>8.1f}{'' if pct is None else f'{pct:.1f}':>7}{ratio:>7.2f}")
    print("ratio: vs torch.mm(e, B) * scale (project rows), vs project + slice + f'(a) in torch (project_points)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    res = run(a.device, dtype, a.quick, a.out)
    print_table(res)
    return res


if __name__ == "__main__":
    main()
