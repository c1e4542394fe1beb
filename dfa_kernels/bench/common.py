"""Timing, device peaks and result files shared by the benchmarks."""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

# Dense peaks (no sparsity) from the vendors' data sheets: TFLOP/s by dtype, HBM GB/s.
DEVICE_PEAKS = {
    "H100 80GB HBM3": {"tflops": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0}, "gbps": 3350.0},
    "H100": {"tflops": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0}, "gbps": 3350.0},
    "H200": {"tflops": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.0}, "gbps": 4800.0},
    "A100": {"tflops": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0}, "gbps": 2039.0},
}


def device_peak(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None  # CPU peaks are not published for this machine: report achieved rates only
    name = torch.cuda.get_device_name(device)
    for key, peak in DEVICE_PEAKS.items():
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 3, repeats: int = 10, min_time_s: float = 0.05) -> float:
    """Median wall time of fn() in ms; each sample runs fn enough times to last min_time_s."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    inner = max(1, int(min_time_s / once))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(samples)


def git_sha() -> str | None:
    """HEAD of the checkout the benchmark runs from (the working directory, else this package's
    own folder when it is an editable install), "-dirty" when tracked files changed; None outside git."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=where)
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=where).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        return out.stdout.strip() + ("-dirty" if dirty else "")
    return None


def environment(device: torch.device) -> dict:
    from .. import build_info
    info = build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": info["torch"], "triton": info["triton"], "cuda": info["torch_cuda"],
        "cuda_compiled": info["cuda_compiled"], "cuda_archs": info["cuda_archs"],
    }


def write_results(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
