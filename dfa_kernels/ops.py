"""The projection ops: registration (fake kernels, autograd, Triton ops), backend choice, wrappers.

Schemas are defined once, in ``csrc/ops.cpp``. The C++ library registers the CPU and CUDA kernels
for them; the Triton backend registers the same schemas under ``triton_<name>`` (one op per
backend, so a call names its backend and ``torch.compile`` sees which kernel runs); the ``torch``
backend is the plain-PyTorch reference, traceable as is.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import numbers
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import flops, reference, selftest
from .feedback import FeedbackSpec

log = logging.getLogger("dfa_kernels")


def _fallback_message(error: str) -> str:
    """What a failed load of the compiled library means for the user, and the fix."""
    if error.startswith("built against"):  # found from the file, before loading it (_load_compiled)
        what = (
            f"the compiled library dfa_kernels._C was {error}, so it was not loaded (a library built against "
            "another torch fails to load with undefined symbols, or loads and misbehaves)"
        )
    else:
        if "undefined symbol" in error:
            why = f"it was built against another torch than the one running ({torch.__version__})"
        elif "No module named" in error:
            why = "it was not built (an install without the compile step?)"
        else:
            why = "see the error"
        what = f"the compiled library dfa_kernels._C failed to load ({error}): {why}"
    return (
        f"dfa_kernels: {what}. The 'cpu' and 'cuda' backends (and the Triton ops' schemas) are unavailable, so "
        "backend='auto' runs the plain-PyTorch 'torch' backend, far slower. Fix: rebuild it against this torch: "
        f"{_rebuild_command()}; `dfa-kernels info` shows the build."
    )


def _rebuild_command() -> str:
    """The command that rebuilds the library against the running torch, for this kind of install."""
    root = Path(__file__).resolve().parents[1]
    if (root / "setup.py").is_file():  # a checkout (an editable install, or on sys.path)
        return f"`pip install --no-build-isolation -e {root}`"
    # --no-binary: from source, not from the wheel that holds this library (nor one pip cached)
    return (
        "`pip install --no-build-isolation --force-reinstall --no-deps --no-cache-dir --no-binary dfa-kernels "
        "dfa-kernels` (or, from a checkout or an sdist, `pip install --no-build-isolation --force-reinstall "
        "--no-deps PATH`), or install the torch it was built against"
    )


TORCH_RECORD_SECTION = b".dfa_torch_version"


def recorded_torch_version(library: str | os.PathLike[str]) -> str | None:
    """The torch version a compiled dfa_kernels library was built against, read from its file (the
    ELF section python_module.cpp writes) without loading it; None for a file without the record
    (not ELF, or built before the record existed)."""
    with open(library, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:  # 64-bit little-endian
            return None
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        # each section header: name (an offset into the names section), type, flags, address, offset, size
        sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
        f.seek(sections[shstrndx][4])
        names = f.read(sections[shstrndx][5])
        for name, _, _, _, offset, size in sections:
            if names[name : names.find(b"\0", name)] == TORCH_RECORD_SECTION:
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def _load_compiled() -> tuple[ModuleType | None, str | None]:
    """(the compiled library or None, why not). A library built against another torch is not
    loaded at all: it fails with undefined symbols, or loads and misbehaves."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    try:
        built = recorded_torch_version(spec.origin) if spec is not None and spec.origin else None
    except (OSError, ValueError, IndexError, struct.error):
        built = None  # a damaged file: the import below says what is wrong with it
    if built is not None and built != torch.__version__:
        return None, f"built against torch {built}, running torch {torch.__version__}"
    try:  # loading the compiled library registers torch.ops.dfa_kernels.*
        return importlib.import_module(f"{__package__}._C"), None
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"


_C, _C_ERROR = _load_compiled()
if _C_ERROR is not None:  # not loaded: warned once here; in build_info(), `dfa-kernels info` and backend errors
    warnings.warn(_fallback_message(_C_ERROR), RuntimeWarning, stacklevel=2)

BACKENDS = ("cpu", "cuda", "triton", "torch")
STORAGES = ("virtual", "materialized", "auto")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# storage="auto" materializes B (and caches it) while it is at most this big; above, B stays virtual.
MATERIALIZE_LIMIT_BYTES = 64 << 20
_OPS = ("project", "project_materialized", "project_points", "grouped_weight_grad", "feedback_matrix")
ACTIVATIONS = reference.ACTIVATIONS


# ---------------------------------------------------------------- registration
def _fake_project(e, seed, distribution, density, width, scale, col_scale, out_dtype):
    return e.new_empty((e.shape[0], width), dtype=out_dtype or e.dtype)


def _fake_project_materialized(e, B, scale, col_scale, out_dtype):
    return e.new_empty((e.shape[0], B.shape[1]), dtype=out_dtype or e.dtype)


def _fake_project_points(
    e, B, seed, distribution, density, offsets, widths, scales, act_inputs, activations, out_dtype
):
    return [e.new_empty((e.shape[0], w), dtype=out_dtype or e.dtype) for w in widths]


def _fake_grouped_weight_grad(grads, inputs, out_dtype):
    default = grads[0].dtype if len(grads) else torch.float32
    return [g.new_empty((g.shape[1], x.shape[1]), dtype=out_dtype or default) for g, x in zip(grads, inputs)]


def _fake_feedback_matrix(seed, distribution, density, rows, cols, dtype, device):
    return torch.empty((rows, cols), dtype=dtype, device=device)


def _setup_project(ctx, inputs, output):
    e, seed, distribution, density, width, scale, col_scale, _ = inputs
    ctx.spec_args = (seed, distribution, density, e.shape[1], width)
    ctx.scale, ctx.e_dtype = scale, e.dtype
    ctx.save_for_backward(col_scale)


def _backward_project(ctx, grad):
    # dF/de: grad @ B^T. B is materialized for this (tests, gradient checks); DFA never needs it.
    (col_scale,) = ctx.saved_tensors
    seed, distribution, density, rows, cols = ctx.spec_args
    B = reference.feedback_matrix(seed, distribution, rows, cols, density, device=grad.device)
    g = _scaled(grad, ctx.scale, col_scale)
    return (g @ B.T).to(ctx.e_dtype), None, None, None, None, None, None, None


def _setup_project_materialized(ctx, inputs, output):
    e, B, scale, col_scale, _ = inputs
    ctx.scale = scale
    ctx.save_for_backward(e, B, col_scale)


def _backward_project_materialized(ctx, grad):
    e, B, col_scale = ctx.saved_tensors
    g = _scaled(grad, ctx.scale, col_scale)
    grad_e = (g @ B.float().T).to(e.dtype) if ctx.needs_input_grad[0] else None
    grad_B = (e.float().T @ g).to(B.dtype) if ctx.needs_input_grad[1] else None
    return grad_e, grad_B, None, None, None


def _setup_project_points(ctx, inputs, output):
    e, B, seed, distribution, density, offsets, widths, scales, act_inputs, activations, out_dtype = inputs
    ctx.spec_args, ctx.activations = (seed, distribution, density, offsets, widths, scales), activations
    ctx.save_for_backward(e, B, *act_inputs)


def _backward_project_points(ctx, grads):
    # Through the differentiable reference: gradient checks and tests only (DFA never needs it).
    e, B, *act_inputs = ctx.saved_tensors
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        e_ = e.detach().requires_grad_(needs[0])
        B_ = None if B is None else B.detach().requires_grad_(needs[1])
        # torch.library sees act_inputs as tensors only when none is None; otherwise as a constant.
        need_acts = needs[8] if isinstance(needs[8], (list, tuple)) else [False] * len(act_inputs)
        acts = [None if a is None else a.detach().requires_grad_(n) for a, n in zip(act_inputs, need_acts)]
        seed, distribution, density, offsets, widths, scales = ctx.spec_args
        outs = reference.project_points(
            e_, B_, seed, distribution, density, offsets, widths, scales, acts, ctx.activations, e.dtype
        )
        wrt = [t for t in (e_, B_, *acts) if t is not None and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = iter(
            torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            if pairs and wrt
            else [None] * len(wrt)
        )
    got = {id(t): next(found) for t in wrt}
    grad_e = got.get(id(e_))
    grad_B = None if B_ is None else got.get(id(B_))
    grad_acts = [got.get(id(a)) for a in acts] if isinstance(needs[8], (list, tuple)) else None
    return grad_e, grad_B, None, None, None, None, None, None, grad_acts, None, None


def _setup_grouped_weight_grad(ctx, inputs, output):
    grads, xs, _ = inputs
    ctx.save_for_backward(*grads, *xs)
    ctx.n = len(grads)


def _backward_grouped_weight_grad(ctx, douts):
    saved = ctx.saved_tensors
    grads, xs = saved[: ctx.n], saved[ctx.n :]
    d_grads = [(x.float() @ d.float().T).to(g.dtype) for g, x, d in zip(grads, xs, douts)]
    d_xs = [(g.float() @ d.float()).to(x.dtype) for g, x, d in zip(grads, xs, douts)]
    return d_grads, d_xs, None


def _scaled(grad, scale, col_scale):
    g = grad.float() * scale
    return g * col_scale if col_scale is not None else g


def _triton_impl(name):
    def impl(*args):
        from . import triton as dk_triton  # imported on first use: triton is heavy to import

        return getattr(dk_triton, name)(*args)

    return impl


_LIBRARY: torch.library.Library | None = None  # the Triton ops' fragment, once registered


def _register() -> None:
    lib = torch.library.Library("dfa_kernels", "FRAGMENT")
    global _LIBRARY
    _LIBRARY = lib  # keep the fragment alive
    fakes: dict[str, Callable[..., Any]] = {
        "project": _fake_project,
        "project_materialized": _fake_project_materialized,
        "project_points": _fake_project_points,
        "grouped_weight_grad": _fake_grouped_weight_grad,
        "feedback_matrix": _fake_feedback_matrix,
    }
    autograd: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "project": (_backward_project, _setup_project),
        "project_materialized": (_backward_project_materialized, _setup_project_materialized),
        "project_points": (_backward_project_points, _setup_project_points),
        "grouped_weight_grad": (_backward_grouped_weight_grad, _setup_grouped_weight_grad),
    }
    for name in _OPS:
        schema = str(getattr(torch.ops.dfa_kernels, name).default._schema)
        signature = schema[schema.index("(") :]
        lib.define(f"triton_{name}{signature}")
        lib.impl(f"triton_{name}", _triton_impl(name), "CompositeExplicitAutograd")
        for op in (name, f"triton_{name}"):
            torch.library.register_fake(f"dfa_kernels::{op}", fakes[name])
            if name in autograd:
                backward, setup = autograd[name]
                torch.library.register_autograd(f"dfa_kernels::{op}", backward, setup_context=setup)
    flops.register()


if _C is not None:
    _register()


# ---------------------------------------------------------------- backends
def _triton_available(device_type: str) -> bool:
    try:
        from . import triton as dk_triton
    except ImportError:
        return False
    return dk_triton.is_available(device_type)


def _parse_arch(arch: str) -> tuple[int, int, bool, bool]:
    """ "9.0+PTX" -> (9, 0, ptx, arch-specific): TORCH_CUDA_ARCH_LIST's tokens ("9.0a" is arch-specific)."""
    ptx = arch.endswith("+PTX")
    version = arch.removesuffix("+PTX")
    specific = version[-1:].isalpha()
    major, minor = version.rstrip("abf").split(".")
    return int(major), int(minor), ptx, specific


def cuda_arch_problem(capability: tuple[int, int], archs: Sequence[str]) -> str | None:
    """None when kernels compiled for `archs` run on a GPU of compute `capability`, else why not.

    A cubin for sm_XY runs on sm_XZ with Z >= Y (sm_90a on sm_90 only); PTX for compute_XY is
    compiled by the driver for any newer GPU."""
    major, minor = capability
    for arch in archs:
        M, m, ptx, specific = _parse_arch(arch)
        if (M, m) == (major, minor) or (M == major and m <= minor and not specific) or (ptx and (M, m) <= capability):
            return None
    return (
        f"the CUDA kernels were compiled for {', '.join(archs) or 'no architecture'} "
        f"(TORCH_CUDA_ARCH_LIST at build time), which cannot run on this GPU (compute capability "
        f'{major}.{minor}): rebuild them for it, `TORCH_CUDA_ARCH_LIST="{major}.{minor}" pip install '
        f"--no-build-isolation -e .`. Until then backend='auto' runs Triton (or torch) on it"
    )


@functools.cache
def _cuda_arch_check(index: int) -> str | None:
    """cuda_arch_problem for GPU `index`, checked at its first use, and warned once."""
    assert _C is not None  # _cuda_unavailable checked it
    problem = cuda_arch_problem(torch.cuda.get_device_capability(index), _C.build_config()["cuda_archs"])
    if problem:
        warnings.warn(f"dfa_kernels: {torch.cuda.get_device_name(index)}: {problem}", RuntimeWarning, stacklevel=3)
    return problem


def _cuda_unavailable(device: torch.device) -> str | None:
    """Why the 'cuda' backend cannot run on `device` (None: it can)."""
    if _C is None:
        return f"compiled library not loaded: {_C_ERROR}"
    if not _C.build_config()["cuda_compiled"]:
        return "dfa_kernels was built without its CUDA kernels (no nvcc at build time, or DFA_KERNELS_FORCE_CPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return _cuda_arch_check(device.index if device.index is not None else torch.cuda.current_device())


def _runnable_backends(device: torch.device) -> list[str]:
    """Backends that can run on `device`, before the GPU ones' self-test."""
    found = []
    if _C is not None and device.type == "cpu":
        found.append("cpu")
    if device.type == "cuda" and _cuda_unavailable(device) is None:
        found.append("cuda")
    if _C is not None and device.type in ("cpu", "cuda") and _triton_available(device.type):  # needs the schemas
        found.append("triton")
    return found + ["torch"]


# Under torch.compile a constant of the graph, as _auto_backend: the test runs kernels and reads a file.
@torch.compiler.assume_constant_result
def _self_test_problem(device: str, backend: str) -> str | None:
    """Why GPU `backend` may not run on CUDA `device` by its self-test (run at the first call; see selftest)."""
    return selftest.problem(backend, device, lambda: {name: _op(backend, name) for name in _OPS})


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device`, fastest first ('auto' takes the first). On a GPU, the
    'cuda' and 'triton' backends only once they pass their self-test there (dfa_kernels.selftest)."""
    device = torch.device(device)
    found = _runnable_backends(device)
    if device.type == "cuda":
        name = str(device)
        found = [b for b in found if b not in selftest.GPU_BACKENDS or _self_test_problem(name, b) is None]
    return found


# backend="auto" reads the fastest backend per (op, storage, shape class) from a table that
# benchmarks/bench_projection.py measured on the same device model; without one, the first of
# available_backends() (compiled kernels before Triton before torch).
BACKEND_TABLES = Path(__file__).parent / "backend_tables"


CPU_ISAS = ("avx512", "avx2", "baseline")


def cpu_isa() -> str | None:
    """The instruction-set path the CPU kernels take ("avx512", "avx2" or "baseline": the best this CPU
    runs, or DFA_KERNELS_CPU_ISA); None without the compiled library."""
    return _C.cpu_isa() if _C is not None else None


def cpu_isas_supported() -> list[str]:
    """The paths this CPU can run, best first."""
    if _C is None:
        return []
    return list(CPU_ISAS[CPU_ISAS.index(_C.cpu_isa_detected()) :])


def device_slug(device: torch.device | str) -> str:
    """The name of a device model as a file name: "cpu_<isa path>" (e.g. "cpu_avx2": the CPU kernels'
    speed depends on the path more than on the model), or e.g. "nvidia_h100_80gb_hbm3"."""
    device = torch.device(device)
    if device.type != "cuda":
        isa = cpu_isa() if device.type == "cpu" else None
        return f"{device.type}_{isa}" if isa else device.type
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def shape_class(out_features: int) -> str:
    """The projection's regime: an outer product (memory bound), a mid-size GEMM, or a wide one."""
    return "narrow" if out_features <= 16 else ("medium" if out_features <= 1024 else "wide")


@functools.cache
def backend_table(slug: str) -> dict[str, str]:
    """{"op|storage|shape_class": backend} measured on device model `slug` ({} if never measured)."""
    path = BACKEND_TABLES / f"{slug}.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("choices", {}))


def resolve_backend(
    backend: str,
    device: torch.device | str,
    op: str | None = None,
    storage: str | None = None,
    out_features: int | None = None,
) -> str:
    """The backend a call with `backend` runs on `device`; raises if it cannot run there.

    "auto" takes the measured choice for (op, storage, out_features) when the device's table has
    one that is available here, else the first available backend; the choice is logged (debug).
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if op is not None and out_features is None:
        raise ValueError(
            f"resolve_backend: out_features (the error's width, which picks the measured choice) is "
            f"needed with op={op!r}; got None"
        )
    if backend == "auto":
        return _auto_backend(str(torch.device(device)), op, storage, out_features)
    available = available_backends(device)
    if backend not in available:
        why = f" (compiled library not loaded: {_C_ERROR})" if _C is None and backend in ("cpu", "cuda") else ""
        if backend in _runnable_backends(torch.device(device)):  # a GPU backend that failed its self-test
            why = f" ({_self_test_problem(str(torch.device(device)), backend)})"
        elif backend == "cuda" and torch.device(device).type == "cuda" and _C is not None:
            why = f" ({_cuda_unavailable(torch.device(device))})"
        raise RuntimeError(
            f"backend {backend!r} is not available on device {torch.device(device)}{why}; available there: {available}"
        )
    return backend


# Without a measured table: the first available backend, except for these (device type, op),
# which prefer the listed backends when available. CUDA's project_points is a SIMT tile; Triton's
# runs on tensor cores.
UNMEASURED_PREFERENCE: dict[tuple[str, str | None], tuple[str, ...]] = {("cuda", "project_points"): ("triton",)}


# Under torch.compile the choice is made once, at trace time, and is a constant of the graph
# (the table is a file and the log a side effect: neither can be traced).
@torch.compiler.assume_constant_result
def _auto_backend(device: str, op: str | None, storage: str | None, out_features: int | None) -> str:
    available = available_backends(device)
    chosen, why = available[0], "first available"
    preferred = [b for b in UNMEASURED_PREFERENCE.get((torch.device(device).type, op), ()) if b in available]
    if preferred:
        chosen, why = preferred[0], "preferred without a measurement"
    if op is not None:
        assert out_features is not None  # resolve_backend checked it
        key = f"{op}|{storage}|{shape_class(out_features)}"
        measured = backend_table(device_slug(device)).get(key)
        if measured in available:
            chosen, why = measured, f"measured fastest for {key}"
    log.debug("dfa_kernels: backend='auto' on %s -> %r (%s; available: %s)", device, chosen, why, available)
    return chosen


def _op(backend: str, name: str) -> Any:
    return getattr(torch.ops.dfa_kernels, f"triton_{name}" if backend == "triton" else name)


# ---------------------------------------------------------------- public functions
def check_error_tensor(e: object, out_features: int, name: str = "e") -> None:
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(e).__name__}")
    if e.dim() != 2 or e.shape[1] != out_features:
        raise ValueError(f"{name} must have shape [N, out_features={out_features}]; got {tuple(e.shape)}")
    if e.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {e.dtype}")
    if not e.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call {name}.contiguous() first")


def _check_spec(spec: object) -> None:
    if not isinstance(spec, FeedbackSpec):
        raise TypeError(f"spec must be a dk.FeedbackSpec; got {type(spec).__name__}")


def _check_scale(scale: object, name: str = "scale") -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite number; got {scale!r}")


def _check_col_scale(col_scale: object, width: int, device: torch.device) -> None:
    if col_scale is None:
        return
    if not isinstance(col_scale, torch.Tensor) or col_scale.shape != (width,) or col_scale.dtype != torch.float32:
        raise ValueError(
            f"col_scale must be a float32 tensor of shape [{width}]; got "
            f"{getattr(col_scale, 'dtype', type(col_scale))} {tuple(getattr(col_scale, 'shape', ()))}"
        )
    if col_scale.device != device:
        raise ValueError(f"col_scale is on {col_scale.device} but e is on {device}")


def resolve_storage(
    storage: str, spec: FeedbackSpec, device: torch.device | str | None = None, op: str = "project"
) -> str:
    """The storage a call with `storage` uses. "auto": virtual when B would exceed 64 MiB (fp32);
    otherwise what the device's measured table found faster for (op, shape class) when it has it
    (bench_projection writes "storage|<op>|<class>"), else materialized (a stored B in the error's
    dtype: cuBLAS on the tensor cores for 16-bit errors)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(map(repr, STORAGES))}; got {storage!r}")
    if storage != "auto":
        return storage
    if spec.out_features * spec.total_width * 4 > MATERIALIZE_LIMIT_BYTES:
        return "virtual"
    measured = None if device is None else _measured_storage(str(torch.device(device)), op, spec.out_features)
    return measured or "materialized"


@torch.compiler.assume_constant_result  # a file read: a constant of a traced graph, as _auto_backend
def _measured_storage(device: str, op: str, out_features: int) -> str | None:
    measured = backend_table(device_slug(device)).get(f"storage|{op}|{shape_class(out_features)}")
    return measured if measured in ("virtual", "materialized") else None


def feedback_matrix(
    spec: FeedbackSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", backend: str = "auto"
) -> torch.Tensor:
    """Materialize B [out_features, total_width] of `spec` (unscaled)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return reference.feedback_matrix(
            spec.seed, spec.distribution, spec.out_features, spec.total_width, spec.density, dtype, device
        )
    return _op(backend, "feedback_matrix")(
        spec.seed, spec.distribution, spec.density, spec.out_features, spec.total_width, dtype, device
    )


_MATRIX_CACHE: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
_MATRIX_CACHE_SIZE = 8


def stored_dtype(e: torch.Tensor, backend: str) -> torch.dtype:
    """The dtype a stored B is kept in for errors like `e`: e's own 16-bit dtype for the GPU
    kernels (cuBLAS / tl.dot on the tensor cores read it as is, half the bytes; B rounded to it, as
    the virtual tensor-core paths do), fp32 otherwise (the CPU kernels and the reference)."""
    if e.device.type == "cuda" and backend in ("cuda", "triton") and e.dtype in (torch.float16, torch.bfloat16):
        return e.dtype
    return torch.float32


def cached_matrix(
    spec: FeedbackSpec, device: torch.device | str, backend: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """B of `spec` on `device` in `dtype`, built once (least recently used of 8 evicted)."""
    key = (spec.seed, spec.distribution, spec.density, spec.out_features, spec.total_width, str(device), dtype)
    if torch.compiler.is_compiling():  # a traced graph builds B itself instead of reading a cache
        return feedback_matrix(spec, dtype, device, backend)
    if key in _MATRIX_CACHE:
        _MATRIX_CACHE.move_to_end(key)
        return _MATRIX_CACHE[key]
    B = feedback_matrix(spec, dtype, device, backend)
    _MATRIX_CACHE[key] = B
    while len(_MATRIX_CACHE) > _MATRIX_CACHE_SIZE:
        _MATRIX_CACHE.popitem(last=False)
    return B


def clear_matrix_cache() -> int:
    """Drop the stored B matrices that storage="materialized" (or "auto") built; returns how many.
    The cache keeps the 8 most recently used (up to 64 MiB each under "auto")."""
    count = len(_MATRIX_CACHE)
    _MATRIX_CACHE.clear()
    return count


def project(
    e: torch.Tensor,
    spec: FeedbackSpec,
    storage: str = "virtual",
    backend: str = "auto",
    *,
    scale: float = 1.0,
    col_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """F = scale * (e @ B) [* col_scale]: e [N, out_features] -> F [N, spec.total_width].

    storage="virtual" generates B in tiles inside the kernel (zero bytes of B; the torch backend in
    bounded blocks); "materialized" builds B once per (spec, device, dtype) and caches it; "auto"
    picks per device (see resolve_storage), virtual above 64 MiB.
    Accumulates in fp32; returns out_dtype (default e.dtype). NaN/Inf in e propagate exactly as
    they do through ``e @ B`` (the DFA module checks its error before projecting).
    """
    _check_spec(spec)
    check_error_tensor(e, spec.out_features)
    _check_scale(scale)
    width = spec.total_width
    _check_col_scale(col_scale, width, e.device)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")
    storage = resolve_storage(storage, spec, e.device, "project")
    backend = resolve_backend(backend, e.device, "project", storage, spec.out_features)
    if storage == "virtual":
        args = (e, spec.seed, spec.distribution, spec.density, width, float(scale), col_scale, out_dtype)
        if backend == "torch":
            return reference.project(*args)
        return _op(backend, "project")(*args)
    B = cached_matrix(spec, e.device, backend, stored_dtype(e, backend))
    if backend == "torch":
        return reference.project_materialized(e, B, float(scale), col_scale, out_dtype)
    return _op(backend, "project_materialized")(e, B, float(scale), col_scale, out_dtype)


def _check_points(
    spec: FeedbackSpec,
    N: int,
    scales: Sequence[float],
    act_inputs: Sequence[torch.Tensor | None] | None,
    activations: Sequence[str] | None,
    device: torch.device,
) -> tuple[list[float], list[torch.Tensor | None], list[str]]:
    count = len(spec.widths)
    for x in scales:
        _check_scale(x, "scales[l]")
    scales = [float(x) for x in scales]
    act_inputs = [None] * count if act_inputs is None else list(act_inputs)
    activations = ["none"] * count if activations is None else list(activations)
    if not len(scales) == len(act_inputs) == len(activations) == count:
        raise ValueError(
            f"scales, act_inputs and activations need one entry per point ({count}); got "
            f"{len(scales)}, {len(act_inputs)} and {len(activations)}"
        )
    for l, (a, act, w) in enumerate(zip(act_inputs, activations, spec.widths)):
        if act not in ACTIVATIONS:
            raise ValueError(f"activations[{l}] must be one of {ACTIVATIONS}; got {act!r}")
        if (act == "none") != (a is None):
            raise ValueError(
                f"act_inputs[{l}] must be the pre-activation [N, {w}] when activations[{l}] is "
                f"not 'none', and None when it is; got activation {act!r} with "
                f"{'None' if a is None else tuple(a.shape)}"
            )
        if a is not None and (a.shape != (N, w) or a.device != device or a.dtype not in FLOAT_DTYPES):
            raise ValueError(
                f"act_inputs[{l}] must be a float tensor of shape [N, {w}] = [{N}, {w}] on {device}; "
                f"got {a.dtype} {tuple(a.shape)} on {a.device}"
            )
    return scales, [None if a is None else a.contiguous() for a in act_inputs], activations


def project_points(
    e: torch.Tensor,
    spec: FeedbackSpec,
    storage: str = "virtual",
    backend: str = "auto",
    *,
    scales: Sequence[float] | None = None,
    act_inputs: Sequence[torch.Tensor | None] | None = None,
    activations: Sequence[str] | None = None,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Every point's gradient in one launch: out[l] = (scales[l] * (e @ B_l)) * f_l'(act_inputs[l]).

    B_l is point l's column block of B (``spec.offsets``/``spec.widths``); scales default to
    ``spec.scales()``. A point with activation "none" (the default) gets the plain projection; one
    with "relu", "gelu", "tanh", "sigmoid" or "silu" passes its pre-activation [N, d_l] and
    receives grad(pre-activation) directly: the fused epilogue.
    """
    _check_spec(spec)
    check_error_tensor(e, spec.out_features)
    scales, act_inputs, activations = _check_points(
        spec, e.shape[0], spec.scales() if scales is None else scales, act_inputs, activations, e.device
    )
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16; got {out_dtype}")
    storage = resolve_storage(storage, spec, e.device, "project_points")
    backend = resolve_backend(backend, e.device, "project_points", storage, spec.out_features)
    B = cached_matrix(spec, e.device, backend, stored_dtype(e, backend)) if storage == "materialized" else None
    args = (
        e,
        B,
        spec.seed,
        spec.distribution,
        spec.density,
        list(spec.offsets),
        list(spec.widths),
        scales,
        act_inputs,
        activations,
        out_dtype,
    )
    if backend == "torch":
        return reference.project_points(*args)
    return _op(backend, "project_points")(*args)


def grouped_weight_grad(
    grads: Iterable[torch.Tensor],
    inputs: Iterable[torch.Tensor],
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Weight gradients of independent linear layers in one launch: out[l] = grads[l]^T @ inputs[l].

    grads[l]: [N_l, out_l] (the layer's output gradient), inputs[l]: [N_l, in_l]; accumulated in
    fp32, returned in out_dtype (default grads[0].dtype).
    """
    grads, inputs = list(grads), list(inputs)
    if len(grads) != len(inputs):
        raise ValueError(f"grads and inputs need one tensor per layer; got {len(grads)} and {len(inputs)}")
    if not grads:
        return []
    device = grads[0].device
    for l, (g, x) in enumerate(zip(grads, inputs)):
        if g.dim() != 2 or x.dim() != 2 or g.shape[0] != x.shape[0]:
            raise ValueError(
                f"grads[{l}] must be [N, out] and inputs[{l}] [N, in] with the same N; got "
                f"{tuple(g.shape)} and {tuple(x.shape)}"
            )
        if g.dtype not in FLOAT_DTYPES or g.dtype != x.dtype or g.device != device or x.device != device:
            raise ValueError(
                f"grads[{l}] and inputs[{l}] must share one float dtype and the device {device}; got "
                f"{g.dtype} on {g.device} and {x.dtype} on {x.device}"
            )
    backend = resolve_backend(backend, device)
    if backend == "torch":
        return reference.grouped_weight_grad(grads, inputs, out_dtype)
    return _op(backend, "grouped_weight_grad")(grads, inputs, out_dtype)


# ---------------------------------------------------------------- build information
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict[str, Any]:
    """Versions, what was compiled, the backends available on each device, and `warnings`: every
    fallback in effect (the compiled library not loaded, a GPU its kernels cannot run on, cuBLAS
    without the grouped GEMM), with its fix."""
    config = _C.build_config() if _C is not None else {}
    runtime = _C.runtime_info() if _C is not None and hasattr(_C, "runtime_info") else {}
    devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    found = []
    if _C_ERROR is not None:
        found.append(_fallback_message(_C_ERROR))
    cuda_checks: dict[str, str] = {}
    for d in devices[1:]:
        problem = _cuda_unavailable(torch.device(d))
        cuda_checks[d] = problem or "ok"
        if problem and _C is not None:
            found.append(f"{d} ({torch.cuda.get_device_name(d)}): the 'cuda' backend cannot run: {problem}")
    self_test: dict[str, dict[str, str]] = {}
    for d in devices[1:]:
        runnable, self_test[d] = _runnable_backends(torch.device(d)), {}
        for b in selftest.GPU_BACKENDS:
            if b not in runnable:
                self_test[d][b] = "not run: the backend cannot run here"
                continue
            problem = _self_test_problem(d, b)  # runs the test unless this process or the cache has its result
            self_test[d][b] = selftest.status(b, d)
            if problem:
                found.append(f"{d} ({torch.cuda.get_device_name(d)}): the {b!r} backend is not offered: {problem}")
    if _C is not None and not backend_table(device_slug("cpu")):
        found.append(
            f"no measured backend table for {device_slug('cpu')} (dfa_kernels/backend_tables/): "
            f"backend='auto' takes {available_backends('cpu')[0]!r} on the CPU unmeasured; "
            f"`dfa-kernels bench --which projection` measures one"
        )
    grouped = runtime.get("grouped_gemm")
    if grouped and grouped.startswith("unavailable") and torch.cuda.is_available():
        found.append(f"grouped_weight_grad (cuda): {grouped} (update cuBLAS, e.g. the nvidia-cublas wheel, to >= 12.5)")
    if torch.cuda.is_available() and not _triton_available("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        found.append(
            "Triton is not importable: the 'triton' backend (project_points on tensor cores, the LM head's "
            "cross-entropy kernel) is unavailable; pip install triton"
        )
    return {
        "dfa_kernels": _version("dfa-kernels"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "extension_loaded": _C is not None,
        "extension_error": _C_ERROR,
        "cuda_compiled": bool(config.get("cuda_compiled", False)),
        "cuda_archs": list(config.get("cuda_archs", [])),
        "built_against_torch": config.get("torch_version_built"),
        "openmp": config.get("openmp"),
        # the CPU kernels' instruction-set path, and the best this CPU runs (DFA_KERNELS_CPU_ISA forces one)
        "cpu_isa": cpu_isa(),
        "cpu_isa_detected": _C.cpu_isa_detected() if _C is not None else None,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_arch_check": cuda_checks,
        "grouped_gemm": grouped,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "backends": {d: available_backends(d) for d in devices},
        # per GPU and backend: passed, failed (the op and the error), skipped (DFA_KERNELS_SELF_TEST=0)
        "self_test": self_test or "no GPU (only the GPU backends are self-tested)",
        "self_test_cache": str(selftest.cache_path()),
        # the measured table backend="auto" reads on each device (None: first available backend)
        "backend_tables": {d: (f"{device_slug(d)}.json" if backend_table(device_slug(d)) else None) for d in devices},
        "warnings": found,
    }
