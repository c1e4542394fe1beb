"""Timing, device peaks and result files shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..provenance import cpu_model, git_sha, machine

try:  # the progress bars are optional: a bare GPU machine may lack tqdm
    from tqdm import tqdm
except ImportError:  # pragma: no cover

    class tqdm:  # noqa: N801 - the same name and the calls the benchmarks use
        def __init__(self, iterable=None, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix_str(self, *args, **kwargs):
            pass


# Dense peaks (no sparsity) from the vendors' data sheets: TFLOP/s by dtype ("fp32": the CUDA cores;
# "tf32"/"bf16"/"fp16": the tensor cores), HBM GB/s. Matched against torch.cuda.get_device_name in
# order, so the more specific names come first ("H100 PCIe" before the SXM part's plain "H100").
DEVICE_PEAKS = [
    ("H200 NVL", {"tflops": {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}, "gbps": 4800.0}),
    ("H200", {"tflops": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, "gbps": 4800.0}),
    ("H100 NVL", {"tflops": {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}, "gbps": 3900.0}),
    ("H100 PCIe", {"tflops": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}, "gbps": 2000.0}),
    ("H100", {"tflops": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, "gbps": 3350.0}),  # SXM5
    ("A100-SXM4-80GB", {"tflops": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, "gbps": 2039.0}),
    ("A100 80GB PCIe", {"tflops": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, "gbps": 1935.0}),
    ("A100", {"tflops": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, "gbps": 1555.0}),  # 40GB
]
# The tensor-core peak a compute-bound projection of each input dtype is measured against (fp32
# inputs: TF32, the tensor cores' fp32 path; fp32 rows also report the CUDA cores' "fp32" share).
DTYPE_KEYS = {"float32": "tf32", "float16": "fp16", "bfloat16": "bf16"}


def device_peak(device: torch.device) -> dict | None:
    """{"name", "tflops": {dtype key: TFLOP/s}, "gbps"} of a known GPU; None on a CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None  # CPU peaks are not published for this machine: report achieved rates only
    name = torch.cuda.get_device_name(device)
    for key, peak in DEVICE_PEAKS:
        if key in name:
            return {"name": key, **peak}
    return None


class Deadline:
    """A wall-clock budget shared by the parts of a suite (None: no limit)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.perf_counter()

    def passed(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def statistic(device: torch.device) -> str:
    """How samples are summarised: the minimum on a CPU (a shared VM's neighbours only ever add
    time, in bursts of milliseconds), the median on a GPU."""
    return "min" if torch.device(device).type == "cpu" else "median"


def summarise(samples, device: torch.device) -> float:
    return min(samples) if statistic(device) == "min" else statistics.median(samples)


def time_interleaved(
    fns, device: torch.device, warmup: int = 3, repeats: int = 10, min_time_s: float = 0.05
) -> list[float]:
    """Wall time of each fn() in ms (see `statistic`); each sample runs fn enough times to last
    min_time_s, and the functions' samples alternate (a, b, a, b, ...), so that a ratio of two compares
    the same moments of a shared machine and the same state of its allocator."""
    inner = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        inner.append(max(1, int(min_time_s / max(time.perf_counter() - start, 1e-6))))
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            sync(device)
            samples[i].append((time.perf_counter() - start) / inner[i] * 1e3)
    return [summarise(s, device) for s in samples]


def time_ms(fn, device: torch.device, warmup: int = 3, repeats: int = 10, min_time_s: float = 0.05) -> float:
    """Wall time of fn() in ms (see `statistic`)."""
    return time_interleaved([fn], device, warmup, repeats, min_time_s)[0]


def time_pair_ms(
    fn_a, fn_b, device: torch.device, warmup: int = 3, repeats: int = 10, min_time_s: float = 0.05
) -> tuple[float, float]:
    """Wall times of fn_a() and fn_b() in ms from interleaved samples (time_interleaved)."""
    a, b = time_interleaved([fn_a, fn_b], device, warmup, repeats, min_time_s)
    return a, b


def environment(device: torch.device) -> dict:
    from .. import build_info

    info = build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "machine": machine(),  # CPU model, cores, the CPU kernels' instruction-set path; GPU and driver
        "python": platform.python_version(),
        "torch": info["torch"],
        "triton": info["triton"],
        "cuda": info["torch_cuda"],
        "cuda_compiled": info["cuda_compiled"],
        "cuda_archs": info["cuda_archs"],
    }


# Everything a process needs to run as on a CPU whose best path is `isa`: our kernels' path, and
# ATen's, MKL's and oneDNN's own dispatch (the BLAS baseline must not keep AVX-512 on an "AVX2" run).
ISA_ENV = {
    "avx512": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def isa_env(isa: str) -> dict:
    """Environment variables for a process on instruction-set path `isa` (set before torch loads)."""
    return {"DFA_KERNELS_CPU_ISA": isa, **ISA_ENV[isa]}


def write_results(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
