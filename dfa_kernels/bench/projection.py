"""Projection microbenchmark: each backend x storage x distribution vs torch.mm(e, B) (cuBLAS / CPU BLAS).

Shapes follow the zoo: recommender (out_features 1: an outer product, memory bound), NeRF (4),
graph (7), LM with the error taken before (512) or after (50257) the vocabulary projection.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from .. import FeedbackSpec, available_backends, project
from ..ops import cached_matrix
from .common import device_peak, environment, time_ms, write_results

# name -> (N, out_features, D) per device type
SHAPES = {
    "cpu": {"recsys": (8192, 1, 2048), "nerf": (8192, 4, 2304), "graph": (2708, 7, 1024),
            "lm512": (1024, 512, 4096), "lm50257": (256, 50257, 1024)},
    "cuda": {"recsys": (65536, 1, 4096), "nerf": (65536, 4, 2304), "graph": (2708, 7, 4096),
             "lm512": (8192, 512, 9216), "lm50257": (8192, 50257, 9216)},
}
QUICK = ("recsys", "graph", "lm512")


def _rates(N, K, D, ms, dtype, materialized):
    es = torch.tensor([], dtype=dtype).element_size()
    flops = 2.0 * N * K * D
    moved = N * K * es + N * D * es + (K * D * 4 if materialized else 0)
    return flops / ms / 1e9, moved / ms / 1e6  # TFLOP/s, GB/s


def run(device="cpu", dtype="float32", quick=False, out: Path | None = None, progress=True) -> dict:
    device = torch.device(device)
    dt = getattr(torch, dtype)
    # Triton under the interpreter is a correctness tool, not something to time.
    backends = [b for b in available_backends(device) if not (b == "triton" and device.type == "cpu")]
    shapes = {k: v for k, v in SHAPES[device.type].items() if not quick or k in QUICK}
    peak = device_peak(device)
    rows = []
    jobs = [(name, shape) for name, shape in shapes.items()]
    for name, (N, K, D) in tqdm(jobs, desc="bench_projection", disable=not progress):
        torch.manual_seed(0)
        e = torch.randn(N, K, device=device, dtype=dt)
        B = cached_matrix(FeedbackSpec(K, [D]), device, "torch").to(dt)
        baseline = time_ms(lambda: (torch.mm(e, B) * 0.5).to(dt), device)
        tf, gb = _rates(N, K, D, baseline, dt, True)
        rows.append({"shape": name, "N": N, "out_features": K, "D": D, "impl": "torch.mm", "storage": "materialized",
                     "distribution": "uniform", "ms": baseline, "tflops": tf, "gbps": gb, "ratio_vs_mm": 1.0})
        for backend in backends:
            for storage, dists in (("materialized", ("uniform",)),
                                   ("virtual", ("uniform", "rademacher", "gaussian", "sparse"))):
                for dist in dists:
                    spec = FeedbackSpec(K, [D], distribution=dist)
                    fn = lambda: project(e, spec, storage, backend, scale=0.5)  # noqa: E731
                    ms = time_ms(fn, device)
                    tf, gb = _rates(N, K, D, ms, dt, storage == "materialized")
                    rows.append({"shape": name, "N": N, "out_features": K, "D": D, "impl": backend,
                                 "storage": storage, "distribution": dist, "ms": ms, "tflops": tf, "gbps": gb,
                                 "ratio_vs_mm": baseline / ms})
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
    return result


def print_table(res: dict) -> None:
    print(f"{'shape':<9}{'impl':<10}{'storage':<13}{'dist':<11}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'vs mm':>7}")
    for r in res["rows"]:
        print(f"{r['shape']:<9}{r['impl']:<10}{r['storage']:<13}{r['distribution']:<11}{r['ms']:>9.3f}"
              f"{r['tflops']:>9.3f}{r['gbps']:>8.1f}{r['ratio_vs_mm']:>7.2f}")


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
