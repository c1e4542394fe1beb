"""Compile every Triton kernel of dfa_kernels for sm_80 and sm_90, ahead of time, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' maths on the CPU but is lenient about what
the GPU compiler rejects (types, pointer casts, layouts); this check runs the real compiler down
to cubin on the variants the package launches. Run without TRITON_INTERPRET:

    python scripts/triton_compile_check.py           # every variant, sm_80 and sm_90 (about 2 min)
    python scripts/triton_compile_check.py --quick   # the first variant of each kernel, sm_90
Exit status 1 if any variant fails.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

project = importlib.import_module("dfa_kernels.triton.project")
points = importlib.import_module("dfa_kernels.triton.project_points")
grouped = importlib.import_module("dfa_kernels.triton.grouped_gemm")
cross_entropy = importlib.import_module("dfa_kernels.triton.cross_entropy")
tables = importlib.import_module("dfa_kernels.triton.tables")

FLOAT = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


def signature(fn, pointers: dict, constexprs: dict, floats=()) -> dict:
    """Every argument: a pointer type, a constexpr, fp32 for `floats`, else i32."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        sig[name] = ("constexpr" if name in constexprs else pointers.get(name) or ("fp32" if name in floats else "i32"))
    return sig


def variants():
    """(label, kernel, pointer types, constexprs, float scalars) for the launched combinations."""
    for dt, virtual, dist in itertools.product(("fp32", "bf16"), (True, False), (0, 1, 2, 3)):
        if not virtual and dist:
            continue
        ptrs = {"e_ptr": f"*{dt}", "b_ptr": f"*{dt}", "cs_ptr": "*fp32", "out_ptr": f"*{dt}"}
        base = {"VIRTUAL": virtual, "DIST": dist, "HAS_COL_SCALE": True, "LIBDEVICE": True}
        yield (f"project {dt} virtual={virtual} dist={dist}", project._project_kernel, ptrs,
               {**base, "INPUT_PRECISION": "tf32x3" if dt == "fp32" else "ieee", "BM": 128, "BN": 128, "BK": 32},
               ("scale",))
        yield (f"narrow {dt} virtual={virtual} dist={dist}", project._narrow_kernel, ptrs,
               {**base, "KP": 4, "BM": 32, "BN": 256}, ("scale",))
    for dist in (0, 1, 2, 3):
        yield (f"feedback_matrix dist={dist}", project._feedback_kernel, {"out_ptr": "*bf16"},
               {"DIST": dist, "LIBDEVICE": True, "BR": 32, "BC": 128}, ())
    for dt, has_act, (virtual, aligned), narrow_kp, hints in itertools.product(
            ("fp32", "bf16"), (False, True), ((True, True), (True, False), (False, False)), (0, 4), (False, True)):
        if narrow_kp and aligned:
            continue
        ptrs = {"e_ptr": f"*{dt}", "b_ptr": f"*{dt}", "ptr_tab": "*i64", "meta_tab": "*i64", "scale_tab": "*fp32"}
        yield (f"project_points {dt} act={has_act} virtual={virtual} aligned={aligned} narrow={narrow_kp} "
               f"hints={hints}", points._points_kernel, ptrs,
               {"VIRTUAL": virtual, "DIST": 2, "HAS_ACT": has_act, "ALIGNED": aligned, "NARROW_KP": narrow_kp,
                "HINTS": hints, "OUT_TYPE": FLOAT[dt], "ACT_TYPE": FLOAT[dt], "LIBDEVICE": True,
                "INPUT_PRECISION": "tf32x3" if dt == "fp32" else "ieee", "BM": 64, "BN": 128, "BK": 32}, ())
    for dt, count in (("i64", 1), ("i64", 96), ("fp32", 7)):
        yield (f"device_table {dt} x{count}", tables._fill_kernel, {"dst_ptr": f"*{dt}", "values": (dt,) * count},
               {"COUNT": count}, ())
    for dt in ("fp32", "bf16"):
        ptrs = {t: "*i64" for t in ("g_tab", "x_tab", "out_tab")} | {t: "*i32" for t in ("n_tab", "o_tab", "i_tab")}
        yield (f"grouped_weight_grad {dt}", grouped._grouped_kernel, ptrs,
               {"IN_TYPE": FLOAT[dt], "OUT_TYPE": tl.float32, "MAX_G": 16,
                "INPUT_PRECISION": "tf32x3" if dt == "fp32" else "ieee", "BM": 128, "BN": 128, "BK": 32}, ())
    yield ("cross_entropy", cross_entropy._ce_kernel,
           {"logits_ptr": "*fp32", "target_ptr": "*i64", "loss_ptr": "*fp32"}, {"BLOCK": 8192}, ("inv_count",))


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failures = 0
    count = 0
    seen = set()
    for label, fn, ptrs, consts, floats in variants():
        if quick and fn in seen:
            continue
        seen.add(fn)
        for cc in (90,) if quick else (80, 90):
            count += 1
            try:
                src = ASTSource(fn=fn, signature=signature(fn, ptrs, consts, floats), constexprs=consts)
                triton.compile(src, target=GPUTarget("cuda", cc, 32))
            except Exception as err:  # report every failing variant, not just the first
                failures += 1
                print(f"FAIL sm_{cc} {label}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    print(f"{count - failures}/{count} Triton kernel variants compiled for sm_80/sm_90")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
