"""Builds the compiled part of dfa_kernels: one extension, ``dfa_kernels._C``.

The C++ CPU ops are always built; the CUDA ops too whenever torch is a CUDA build and nvcc is found
(whether a GPU is present does not matter). Package metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .        # or: python setup.py build_ext --inplace

Environment:
    DFA_KERNELS_FORCE_CPU=1   build the CPU ops only
    TORCH_CUDA_ARCH_LIST      CUDA architectures (default "8.0;9.0+PTX": A100, H100/H200, and PTX that
                              the driver compiles for newer GPUs such as sm_100 and sm_120)
    CUDA_HOME                 CUDA toolkit (default: located from the nvcc on PATH)
    MAX_JOBS                  parallel compile jobs (default: number of CPUs, at most 4)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).parent.resolve()
# cubins for sm_80 (A100, and sm_86/sm_89 by minor-version compatibility) and sm_90 (H100/H200),
# plus compute_90 PTX, which the driver compiles at load for any newer GPU (sm_100, sm_120): no
# "no kernel image" there. Older GPUs (sm_75) need their own TORCH_CUDA_ARCH_LIST; the package
# checks the GPU's arch against the compiled list at first use and says so (ops.cuda_arch_problem).
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit of the nvcc on PATH.

    nvcc can be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc), where torch's own
    guess (the parent of nvcc's folder) is wrong, so ask nvcc where its toolkit is.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        dry = None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stderr + dry.stdout, re.M) if dry else None
    return os.path.realpath(match.group(1).strip()) if match else os.path.dirname(os.path.dirname(nvcc))


def nvidia_wheel_include_dirs() -> list[str]:
    """include/ folders of the nvidia-* wheels torch depends on (cusparse.h, cublas_v2.h, ...)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    dirs = []
    for location in spec.submodule_search_locations:
        for include in sorted(Path(location).glob("*/include")):
            dirs.append(str(include))
    return dirs


import torch  # noqa: E402  (after the helpers: CUDA_HOME must be set before cpp_extension loads)

force_cpu = env_flag("DFA_KERNELS_FORCE_CPU")
cuda_home = None if force_cpu or torch.version.cuda is None else find_cuda_home()
with_cuda = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
elif torch.version.cuda is not None and not force_cpu:
    print("dfa_kernels: nvcc not found (set CUDA_HOME); building the CPU ops only", file=sys.stderr)
os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 4))))

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# Every C++ file of csrc/ and csrc/cpu/, and (CUDA builds) every .cu file of csrc/cuda/.
sources = sorted(str(p.relative_to(ROOT)) for d in ("csrc", "csrc/cpu") for p in (ROOT / d).glob("*.cpp"))
define_macros = []
# -g0: Python's own CFLAGS carry -g. -fno-math-errno: lets the CPU generator loops vectorize sqrt.
cxx_flags = ["-O3", "-g0", "-fno-math-errno"]
nvcc_flags = ["-O3", "-lineinfo"]
extra_link_args = []
# The torch this library is built against, recorded in it: python_module.cpp stringizes the bare
# tokens (as DFA_CUDA_ARCHS below) into a section that ops.py reads from the file before loading it.
torch_version = str(torch.__version__)
if not re.fullmatch(r"[0-9A-Za-z.+]+", torch_version):
    sys.exit(f"dfa_kernels: torch version {torch_version!r} cannot be recorded as bare preprocessor tokens")
cxx_flags.append("-DDFA_TORCH_VERSION=" + torch_version)
# Same OpenMP runtime as torch (its at::parallel_for is inline and needs -fopenmp here).
openmp = torch._C.has_openmp and sys.platform.startswith("linux")
if openmp:
    cxx_flags.append("-fopenmp")
    extra_link_args.append("-fopenmp")

if with_cuda:
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    archs = [a for a in re.split(r"[;,\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a]
    nvcc_flags.append(f"--threads={max(1, min(len(archs), os.cpu_count() or 1))}")  # archs in parallel
    define_macros.append(("DFA_CUDA_COMPILED", None))
    extra_link_args.append("-ldl")  # grouped_weight_grad.cu looks cuBLAS's grouped GEMM up at run time
    # Bare tokens (no quotes to survive the shell; python_module.cpp stringizes them), C++ only:
    # nvcc would read the commas as separate -D options.
    cxx_flags.append("-DDFA_CUDA_ARCHS=" + ",".join(archs))
    # After the toolkit's own headers (-isystem), so these only fill in what nvcc lacks.
    for include in nvidia_wheel_include_dirs():
        nvcc_flags += ["-isystem", include]
    extension = CUDAExtension(
        name="dfa_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=extra_link_args,
    )
else:
    extension = CppExtension(
        name="dfa_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "include")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link_args,
    )

SOURCE_RECORD = ROOT / "dfa_kernels" / "_source.json"  # in an sdist (SdistWithSource); never in git


def source_commit() -> dict:
    """The checkout's HEAD and whether tracked files differ from it; outside git (a build from an
    sdist), the commit the sdist recorded; else empty."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return json.loads(SOURCE_RECORD.read_text()) if SOURCE_RECORD.is_file() else {}
    return {"git_sha": sha + ("-dirty" if changed else "")}


class SdistWithSource(sdist):
    """Records the commit in the sdist (dfa_kernels/_source.json), so that a wheel built from it
    names the code it holds although the sdist carries no git history."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        target = Path(base_dir) / "dfa_kernels" / "_source.json"
        target.unlink(missing_ok=True)  # never write through a hard link into the checkout
        target.write_text(json.dumps(source_commit()) + "\n")


class BuildPyWithSource(build_py):
    """Records the commit an installed copy was built from (dfa_kernels/_source.json), so that result
    files name the code that ran, not whatever checkout is the working directory. An editable
    install runs the checkout itself and reads its commit directly."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "dfa_kernels" / "_source.json"
            target.write_text(json.dumps(source_commit()) + "\n")


setup(
    ext_modules=[extension],
    cmdclass={
        "build_ext": BuildExtension.with_options(use_ninja=True),
        "build_py": BuildPyWithSource,
        "sdist": SdistWithSource,
    },
)
