"""Compile every Triton kernel of dfa_kernels ahead of time, down to cubin, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' maths on the CPU but is lenient about what
the GPU compiler rejects (types, pointer casts, layouts); this check runs the real compiler on
what the package launches: every variant with its kernel's first config (all that runs with
DFA_TRITON_AUTOTUNE=0), and every other autotune config on the two variants whose tiles differ
most (fp32 with stored B, bf16 with the virtual rademacher tile). Each kernel must also fit the
architecture's shared memory: a first config or an untuned kernel that does not fails the check
(its launch would fail); another config that does not is listed, as the autotuner skips it there.
Run without TRITON_INTERPRET:

    python scripts/triton_compile_check.py                      # the importable Triton, sm_80 and sm_90
    python scripts/triton_compile_check.py --triton 3.6.0 --arch 90
        # that Triton instead (pip-installed once under ~/.cache/dfa_kernels), sm_90 only
    python scripts/triton_compile_check.py --quick              # one job per kernel, sm_90
    --jobs N: compiles in parallel (default: every CPU). Exit status 1 if any compile fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import itertools
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

project = importlib.import_module("dfa_kernels.triton.project")
points = importlib.import_module("dfa_kernels.triton.project_points")
grouped = importlib.import_module("dfa_kernels.triton.grouped_gemm")
cross_entropy = importlib.import_module("dfa_kernels.triton.cross_entropy")
tables = importlib.import_module("dfa_kernels.triton.tables")
tuning = importlib.import_module("dfa_kernels.triton.tuning")

FLOAT = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
# Shared memory a block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


class Job(NamedTuple):
    label: str
    fn: object  # the triton.jit kernel
    pointers: dict  # argument -> pointer type (a tuple of types for a tuple argument)
    constexprs: dict  # with the config's block sizes
    floats: tuple  # fp32 scalar arguments; every other one is i32
    num_warps: int
    num_stages: int
    tuned: str | None = None  # the autotuned kernel (tuning.TUNED) and the index of its config
    config: int | None = None


def signature(job: Job) -> dict:
    params = inspect.signature(job.fn.fn).parameters
    unknown = set(job.fn.do_not_specialize) - set(params)
    if unknown:  # Triton ignores names that are not parameters
        raise ValueError(f"do_not_specialize names no parameter: {sorted(unknown)}")
    return {
        name: "constexpr"
        if name in job.constexprs
        else job.pointers.get(name) or ("fp32" if name in job.floats else "i32")
        for name in params
    }


def _project(full):
    """(label, pointers, constexprs, floats) of the projection: every variant, or (not `full`) the
    two whose tiles differ most: fp32 with stored B (the most shared memory), bf16 with the
    virtual rademacher tile (bit-expanded words in registers)."""
    for dt, virtual, dist in itertools.product(("fp32", "bf16"), (True, False), (0, 1, 2, 3)):
        if (not virtual and dist) or not (full or (dt, virtual, dist) in (("fp32", False, 0), ("bf16", True, 2))):
            continue
        ptrs = {"e_ptr": f"*{dt}", "b_ptr": f"*{dt}", "cs_ptr": "*fp32", "out_ptr": f"*{dt}"}
        yield (
            f"{dt} virtual={virtual} dist={dist}",
            ptrs,
            {
                "VIRTUAL": virtual,
                "DIST": dist,
                "HAS_COL_SCALE": True,
                "LIBDEVICE": True,
                "INPUT_PRECISION": "tf32x3" if dt == "fp32" else "ieee",
            },
            ("scale",),
        )


def _narrow(full):
    for label, ptrs, consts, floats in _project(full):
        consts = {k: v for k, v in consts.items() if k != "INPUT_PRECISION"}
        yield label, ptrs, {**consts, "KP": 4}, floats


def _points(narrow, full):
    for dt, has_act, (virtual, aligned), hints in itertools.product(
        ("fp32", "bf16"), (False, True), ((True, True), (True, False), (False, False)), (False, True)
    ):
        if narrow and aligned:  # the narrow path has no aligned tile
            continue
        # as _project's: fp32 with stored B, bf16 with the rademacher tile (aligned unless narrow)
        representative = has_act and hints and virtual == (dt == "bf16") and (aligned or narrow or not virtual)
        if not (full or representative):
            continue
        ptrs = {"e_ptr": f"*{dt}", "b_ptr": f"*{dt}", "ptr_tab": "*i64", "meta_tab": "*i64", "scale_tab": "*fp32"}
        yield (
            f"{dt} act={has_act} virtual={virtual} aligned={aligned} hints={hints}",
            ptrs,
            {
                "VIRTUAL": virtual,
                "DIST": 2,
                "HAS_ACT": has_act,
                "ALIGNED": aligned,
                "NARROW_KP": 4 if narrow else 0,
                "HINTS": hints,
                "OUT_TYPE": FLOAT[dt],
                "ACT_TYPE": FLOAT[dt],
                "LIBDEVICE": True,
                "INPUT_PRECISION": "tf32x3" if dt == "fp32" else "ieee",
            },
            (),
        )


def _grouped(full):
    for dt, split, hints in itertools.product(("fp32", "bf16"), (False, True), (False, True)):
        if full or (not split and hints == (dt == "fp32")):
            ptrs = {"ptr_tab": "*i64", "shape_tab": "*i64", "ws_ptr": "*fp32"}
            yield (
                f"{dt} split={split} hints={hints}",
                ptrs,
                {
                    "IN_TYPE": FLOAT[dt],
                    "OUT_TYPE": tl.float32,
                    "MAX_G": 16,
                    "SPLIT": split,
                    "HINTS": hints,
                    "INPUT_PRECISION": "tf32x3" if dt == "fp32" else "ieee",
                },
                (),
            )


# autotuned kernel (tuning.TUNED) -> its variants, all (the first config) or the representative ones
TUNED_VARIANTS = {
    "project": _project,
    "narrow": _narrow,
    "points": lambda full: _points(False, full),
    "narrow_points": lambda full: _points(True, full),
    "grouped": _grouped,
}


def jobs() -> list[Job]:
    out = []
    for name, variants in TUNED_VARIANTS.items():
        tuned = tuning.TUNED[name]
        for index, config in enumerate(tuned.configs):
            for label, ptrs, consts, floats in variants(index == 0):
                out.append(
                    Job(
                        f"{name} {label} config={index}",
                        tuned.kernel,
                        ptrs,
                        {**consts, **config.kwargs},
                        floats,
                        config.num_warps,
                        config.num_stages,
                        name,
                        index,
                    )
                )
    for dist in (0, 1, 2, 3):  # BR, BC and num_warps as feedback_matrix launches them
        out.append(
            Job(
                f"feedback_matrix dist={dist}",
                project._feedback_kernel,
                {"out_ptr": "*bf16"},
                {"DIST": dist, "LIBDEVICE": True, "BR": 32, "BC": 128},
                (),
                4,
                3,
            )
        )
    for dt, log_count in itertools.product(("i64", "fp32"), range(9)):  # every COUNT device_table launches
        count = 1 << log_count
        out.append(
            Job(
                f"device_table {dt} x{count}",
                tables._fill_kernel,
                {"dst_ptr": f"*{dt}", "values": (dt,) * count},
                {"COUNT": count, "ENCODED": dt == "i64"},
                (),
                4,
                3,
            )
        )
    out.append(
        Job(
            "cross_entropy",
            cross_entropy._ce_kernel,
            {"logits_ptr": "*fp32", "target_ptr": "*i64", "loss_ptr": "*fp32", "inv_count_ptr": "*fp32"},
            {"BLOCK": 8192},
            (),
            8,
            3,
        )
    )
    return out


JOBS = jobs()


def compile_job(index: int, cc: int) -> tuple[str | None, int]:
    """(None, its shared memory in bytes) if JOBS[index] compiles for sm_cc, else (why not, 0)."""
    job = JOBS[index]
    try:
        src = ASTSource(fn=job.fn, signature=signature(job), constexprs=job.constexprs)
        kernel = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options={"num_warps": job.num_warps, "num_stages": job.num_stages}
        )
    except Exception as err:  # report every failing job, not just the first
        return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}", 0
    return None, kernel.metadata.shared


def triton_dir(version: str) -> Path:
    """Triton `version` installed (once) with pip under the user's cache, outside any checkout."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dfa_kernels"
    target = root / f"triton-{version}"
    if not (target / "triton").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(tmp),
                f"triton=={version}",
            ],
            check=True,
        )
        try:
            tmp.rename(target)
        except OSError:  # another run installed it meanwhile
            shutil.rmtree(tmp)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first job of each kernel, sm_90")
    parser.add_argument("--triton", metavar="VERSION", help="compile with this Triton instead of the importable one")
    parser.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    if args.triton and triton.__version__ != args.triton:
        if os.environ.get("DFA_COMPILE_CHECK_CHILD"):
            sys.exit(f"asked for Triton {args.triton}, imported {triton.__version__} from {triton.__file__}")
        path = triton_dir(args.triton)
        env = {
            **os.environ,
            "DFA_COMPILE_CHECK_CHILD": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")])),
        }
        return subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode
    archs = (90,) if args.quick else tuple(int(a) for a in args.arch.split(","))
    seen = set()
    work = []
    for index, job in enumerate(JOBS):
        if not (args.quick and job.fn in seen):
            seen.add(job.fn)
            work += [(index, cc) for cc in archs]
    start = time.time()
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(compile_job, *zip(*work)))
    failures = too_large = 0
    for (index, cc), (error, shared) in zip(work, results):
        job = JOBS[index]
        if not error and shared > SHARED_LIMIT[cc]:
            error = f"needs {shared} bytes of shared memory, sm_{cc} has {SHARED_LIMIT[cc]}"
            if job.config:  # not the first config: the autotuner skips it on this architecture
                too_large += 1
                print(f"TOO LARGE sm_{cc} {job.label}: {error}")
                continue
        if error:
            failures += 1
            print(f"FAIL sm_{cc} {job.label}: {error}")
    configs = sum(len(t.configs) for t in tuning.TUNED.values())
    print(
        f"{len(work) - failures}/{len(work)} Triton kernel jobs compiled with Triton {triton.__version__} for "
        f"{'/'.join(f'sm_{cc}' for cc in archs)} in {time.time() - start:.0f} s ({len(tuning.TUNED)} autotuned "
        f"kernels, {configs} configs{', first job of each kernel only' if args.quick else ', every one'}); "
        f"{too_large} too large for shared memory, skipped by the autotuner there"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
