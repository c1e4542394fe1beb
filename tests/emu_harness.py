"""Builds and drives the CUDA-on-CPU harness (tests/cuda_on_cpu/): the CUDA backend's kernels and
launch sequences (csrc/include/dfa_kernels/cuda/) compiled by the host compiler against the emulator,
under ASan + UBSan or TSan. Used by tests/test_cuda_on_cpu.py.

A run writes each case's inputs as raw files, one case per line of a case file, runs the harness once
for all of them and reads back each case's plan, launches and outputs.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HARNESS_DIR = ROOT / "tests" / "cuda_on_cpu"
KERNEL_HEADERS = ROOT / "csrc" / "include"
UNITS = ("harness_main", "harness_project", "harness_points", "harness_gemm")
SANITIZERS = {"asan": "address,undefined", "tsan": "thread"}
# halt at the first report, with the report's exit status: a harness run either is clean or fails
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:detect_leaks=1:handle_abort=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0",
}
KIND = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
DTYPE = {v: k for k, v in KIND.items()}


def _cuda_include_dirs() -> list[str] | str:
    """Include folders with the CUDA runtime's host headers (cuda_runtime.h) and cuBLAS's (cublas_v2.h),
    or why there are none: the CUDA toolkit of the nvcc on PATH (or CUDA_HOME), then the nvidia-* wheels."""
    candidates = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if home:
        candidates.append(Path(home) / "include")
    if nvcc:
        text = Path(nvcc).read_text(errors="ignore") if Path(nvcc).stat().st_size < 4096 else ""
        for word in text.split():  # a wrapper script naming the real nvcc
            if word.endswith("/bin/nvcc"):
                candidates.append(Path(word).parents[1] / "include")
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates += sorted(Path(location).glob("*/include"))
    dirs = []
    for name in ("cuda_runtime.h", "cublas_v2.h"):
        found = next(
            (d for d in candidates if (d / name).exists() and (name != "cuda_runtime.h" or (d / "crt").is_dir())), None
        )
        if found is None:
            return f"no CUDA headers with {name} (looked in {', '.join(map(str, candidates)) or 'nothing'})"
        if found not in dirs:
            dirs.append(found)
    return [str(d) for d in dirs]


def toolchain() -> tuple[str, list[str]] | str:
    """(host compiler, include flags), or the reason the harness cannot be built here."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        return "no host C++ compiler (g++ or clang++) on PATH"
    cuda = _cuda_include_dirs()
    if isinstance(cuda, str):
        return cuda
    from torch.utils.cpp_extension import include_paths

    torch_include = include_paths()[0]  # c10's Half/BFloat16 (header-only)
    flags = ["-isystem", torch_include]
    for d in cuda:
        flags += ["-isystem", d]
    return cxx, flags


def build(
    variant: str,
    out: Path,
    headers: Path = KERNEL_HEADERS,
    reuse: Path | None = None,
    units: tuple[str, ...] = UNITS,
    opt: str = "-O0",
) -> Path:
    """Compiles the harness with `variant`'s sanitizers into out/harness. headers: the include root of
    the kernel headers (a mutated copy, for the mutation tests); reuse: a build folder whose objects
    stand in for the units not listed."""
    tools = toolchain()
    if isinstance(tools, str):
        raise RuntimeError(tools)
    cxx, includes = tools
    out.mkdir(parents=True, exist_ok=True)
    san = SANITIZERS[variant]
    common = [
        cxx,
        "-std=c++20",
        opt,
        "-g1",
        "-DDFA_CUDA_ON_CPU",
        "-Wall",
        "-Wno-unknown-pragmas",
        f"-fsanitize={san}",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        f"-I{HARNESS_DIR}",
        f"-I{headers}",
        *includes,
    ]

    def compile_unit(unit):
        cmd = [*common, "-c", str(HARNESS_DIR / f"{unit}.cpp"), "-o", str(out / f"{unit}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {unit}.cpp failed:\n{proc.stderr[-6000:]}")

    workers = max(1, min(len(units), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(compile_unit, units))
    objects = [str((out if u in units else reuse) / f"{u}.o") for u in UNITS]
    link = [cxx, f"-fsanitize={san}", "-rdynamic", *objects, "-o", str(out / "harness"), "-lpthread", "-ldl"]
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"linking the harness failed:\n{proc.stderr[-4000:]}")
    return out / "harness"


def write_array(t: torch.Tensor, path: Path) -> None:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    t.numpy().tofile(path)


def read_array(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    np_dtype = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.bfloat16: np.int16,
        torch.float64: np.float64,
    }[dtype]
    t = torch.from_numpy(np.fromfile(path, dtype=np_dtype).copy())
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(shape)


@dataclass
class Case:
    id: str
    op: str
    fields: dict
    outputs: dict  # name -> (path, dtype, shape)
    result: dict = field(default_factory=dict)

    def output(self, name: str = "out") -> torch.Tensor:
        path, dtype, shape = self.outputs[name]
        return read_array(path, dtype, shape)


class Run:
    """The cases of one harness invocation."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cases: list[Case] = []

    def _file(self, case_id: str, name: str) -> Path:
        return self.dir / f"{case_id}.{name}.bin"

    def input(self, case_id: str, name: str, t: torch.Tensor) -> str:
        path = self._file(case_id, name)
        write_array(t, path)
        return str(path)

    def add(self, op: str, inputs: dict[str, torch.Tensor], outputs: dict[str, tuple], **fields) -> Case:
        """inputs: name -> tensor (written, its path passed as name=...); outputs: name -> (dtype, shape)
        (the path passed as name=...); fields: everything else, as key=value (lists comma-joined)."""
        case_id = f"c{len(self.cases)}"
        kv = {"id": case_id, "op": op}
        for name, t in inputs.items():
            kv[name] = self.input(case_id, name, t)
        outs = {}
        for name, (dtype, shape) in outputs.items():
            outs[name] = (self._file(case_id, name), dtype, shape)
            kv[name] = str(outs[name][0])
        for k, v in fields.items():
            kv[k] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        case = Case(case_id, op, kv, outs)
        self.cases.append(case)
        return case

    def run(self, binary: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """Runs every case; fills case.result. Raises AssertionError with the harness's report when it fails."""
        case_file = self.dir / "cases.txt"
        case_file.write_text("".join(" ".join(f"{k}={v}" for k, v in c.fields.items()) + "\n" for c in self.cases))
        env = {**os.environ, **SANITIZER_ENV}
        proc = subprocess.run([str(binary), str(case_file)], capture_output=True, text=True, timeout=timeout, env=env)
        by_id = {c.id: c for c in self.cases}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                by_id[rec["id"]].result = rec
        if proc.returncode != 0:
            errors = [c.result.get("error") for c in self.cases if "error" in c.result]
            raise AssertionError(
                f"harness failed (exit {proc.returncode}); case errors: {errors}\nstderr:\n{proc.stderr[-8000:]}"
            )
        missing = [c.id for c in self.cases if not c.result]
        assert not missing, f"no result for cases {missing}"
        return proc


def main() -> None:  # python tests/emu_harness.py asan OUT: build by hand
    variant, out = sys.argv[1], Path(sys.argv[2])
    print(build(variant, out))


if __name__ == "__main__":
    main()
