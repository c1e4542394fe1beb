"""A GPU backend is checked against the reference before it is trusted.

On the first use of the 'cuda' or 'triton' backend on a GPU, every op of that backend runs on a few
tiny, awkward cases (1 and 7 rows, out_features 3 and 17 so the narrow and the GEMM paths both
run, width 37, fp32/fp16/bf16, virtual and materialized B, an activation epilogue, two layers of
the grouped gradient) and is compared with :mod:`dfa_kernels.reference`. A backend that fails one
op (a wrong value, a non-finite one, a wrong shape or dtype, an exception) is not offered on that
device model: ``ops.available_backends`` drops it, so backend="auto" never picks it and asking for
it raises with the recorded failure; a warning names the op and the error, once per process.
The kernels run in milliseconds; the Triton backend's first run also compiles (and autotunes) its
kernels for these shapes, once per build and device model.

The result is cached on disk per (backend, device model, compute capability, dfa_kernels version
and build, torch and triton versions) in ``$DFA_KERNELS_CACHE_DIR/selftest.json`` (default
``$XDG_CACHE_HOME/dfa_kernels/selftest.json``, else ``~/.cache/dfa_kernels/selftest.json``); a
rebuild or an edit of the kernels' sources changes the build and re-runs it. Delete the file to
re-run it; ``DFA_KERNELS_SELF_TEST=0`` skips the test (every backend that can run is offered).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import reference

log = logging.getLogger("dfa_kernels")

ENV = "DFA_KERNELS_SELF_TEST"
GPU_BACKENDS = ("cuda", "triton")
FORMAT = 1
SEED, DENSITY, WIDTH = 1234, 0.25, 37
OK = "ok"

_EPS32 = torch.finfo(torch.float32).eps
# fp32 operands of a GEMM path may be rounded to TF32 (Triton's tl.dot below "highest" matmul
# precision, cuBLAS with TF32 allowed): a correct kernel may be this far off in each operand.
_TF32_EPS = 2.0**-10
# Generating B with the device's libm (the gaussian's log and cos) is off by an absolute amount,
# not a relative one: the bounds add it to every |B| entry.
_B_ABS = 2.0**-8


def enabled() -> bool:
    return os.environ.get(ENV) != "0"


def cache_path() -> Path:
    root = os.environ.get("DFA_KERNELS_CACHE_DIR")
    if root:
        return Path(root) / "selftest.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dfa_kernels" / "selftest.json"


# ---------------------------------------------------------------- the cases and their bounds
def _bound(mag, want, operand_eps: float, K: int, out_dtype) -> torch.Tensor:
    """4x what correct rounding accounts for, per element: each operand rounded by `operand_eps`,
    fp32 accumulation of K terms, one rounding to out_dtype. `mag` = |e| @ |B| (and the same
    scale factors as the output): a wrong entry, column or seed is off by O(mag)."""
    return 4 * (operand_eps + (K + 2) * _EPS32) * mag + 2 * torch.finfo(out_dtype).eps * want.abs()


def _operand_eps(dtype, b_in_kernel: bool) -> float:
    """fp32 may go through TF32; a B generated in the kernel is rounded to a 16-bit e's dtype (a
    stored B is passed in e's dtype already, as ops.stored_dtype keeps it for the GPU backends)."""
    if dtype == torch.float32:
        return _TF32_EPS
    return torch.finfo(dtype).eps if b_in_kernel else 0.0


def _abs_b(B):
    return B.float().abs() + _B_ABS


@functools.lru_cache(maxsize=1)
def _cases() -> list:
    """[(op, what, args in the op's schema order with CPU tensors, [expected], [bound], [dtype])]."""
    g = torch.Generator().manual_seed(0)
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    name = {f32: "fp32", f16: "fp16", bf16: "bf16"}

    def randn(*shape, dtype=f32):
        return torch.randn(*shape, generator=g).to(dtype)

    def B_of(distribution, rows, cols=WIDTH):
        return reference.feedback_matrix(SEED, distribution, rows, cols, DENSITY)

    cases = []
    # project, virtual B: K=3 runs the narrow kernels, K=17 the GEMM ones
    for N, K, dtype, dist, scale, col, out in [
        (7, 3, f32, "gaussian", 0.5, True, None),
        (1, 17, bf16, "uniform", -1.5, False, None),
    ]:
        e = randn(N, K, dtype=dtype)
        cs = torch.rand(WIDTH, generator=g) + 0.5 if col else None
        args = (e, SEED, dist, DENSITY, WIDTH, scale, cs, out)
        want = reference.project(*args[:-1], f32)
        mag = reference.project_materialized(e.abs(), _abs_b(B_of(dist, K)), abs(scale), cs, f32)
        out = out or dtype
        cases.append(
            (
                "project",
                f"N={N} K={K} width={WIDTH} {name[dtype]} {dist}",
                args,
                [want],
                [_bound(mag, want, _operand_eps(dtype, True), K, out)],
                [out],
            )
        )
    # project_materialized: B stored in e's dtype
    for N, K, dtype, dist, scale, col, out in [
        (1, 3, f16, "rademacher", 1.0, False, f32),
        (7, 17, bf16, "gaussian", 2.0, True, None),
    ]:
        e, B = randn(N, K, dtype=dtype), B_of(dist, K).to(dtype)
        cs = torch.rand(WIDTH, generator=g) + 0.5 if col else None
        args = (e, B, scale, cs, out)
        want = reference.project_materialized(e, B, scale, cs, f32)
        mag = reference.project_materialized(e.abs(), _abs_b(B), abs(scale), cs, f32)
        out = out or dtype
        cases.append(
            (
                "project_materialized",
                f"N={N} K={K} width={WIDTH} {name[dtype]} {dist}",
                args,
                [want],
                [_bound(mag, want, _operand_eps(dtype, False), K, out)],
                [out],
            )
        )
    # project_points: materialized, shared layout, silu; virtual, independent layout, gelu
    for N, K, dtype, dist, stored, offsets, widths, acts in [
        (7, 3, f32, "sparse", True, [0, 0], [WIDTH, 5], ["none", "silu"]),
        (7, 17, bf16, "uniform", False, [0, 13], [13, 24], ["gelu", "none"]),
    ]:
        e, B = randn(N, K, dtype=dtype), B_of(dist, K)
        B = B.to(dtype) if stored else None
        scales = [0.5, 2.0]
        act_inputs = [None if a == "none" else randn(N, w, dtype=dtype) for a, w in zip(acts, widths)]
        args = (e, B, SEED, dist, DENSITY, offsets, widths, scales, act_inputs, acts, None)
        wants = reference.project_points(*args[:-1], f32)
        bounds = []
        for off, w, s, a, act, want in zip(offsets, widths, scales, act_inputs, acts, wants):
            mag = (e.float().abs() @ _abs_b(B_of(dist, K)[:, off : off + w])) * abs(s)
            if act != "none":
                mag = mag * reference.activation_grad(a, act).abs()
            bounds.append(_bound(mag, want, _operand_eps(dtype, not stored), K, dtype))
        cases.append(
            (
                "project_points",
                f"N={N} K={K} widths={widths} {name[dtype]} {dist} {'materialized' if stored else 'virtual'} {acts}",
                args,
                wants,
                bounds,
                [dtype] * 2,
            )
        )
    # grouped_weight_grad: two layers of different N, out and in
    for dtype, layers, out in [(f32, [(7, 3, WIDTH), (1, 17, 5)], None), (bf16, [(33, 17, WIDTH), (2, 3, 1)], f32)]:
        grads = [randn(n, o, dtype=dtype) for n, o, _ in layers]
        inputs = [randn(n, i, dtype=dtype) for n, _, i in layers]
        wants = reference.grouped_weight_grad(grads, inputs, f32)
        bounds = [
            _bound(gr.float().abs().T @ x.float().abs(), want, _operand_eps(dtype, False), gr.shape[0], out or dtype)
            for gr, x, want in zip(grads, inputs, wants)
        ]
        cases.append(
            (
                "grouped_weight_grad",
                f"{name[dtype]} layers (N, out, in) {layers}",
                (grads, inputs, out),
                wants,
                bounds,
                [out or dtype] * 2,
            )
        )
    # feedback_matrix: the only op whose output is B itself
    for dist, rows, dtype in [("gaussian", 17, f32), ("sparse", 3, bf16)]:
        want = B_of(dist, rows)
        cases.append(
            (
                "feedback_matrix",
                f"{rows}x{WIDTH} {dist} {name[dtype]}",
                (SEED, dist, DENSITY, rows, WIDTH, dtype, torch.device("cpu")),
                [want],
                [torch.finfo(dtype).eps * want.abs() + 2.0**-16],
                [dtype],
            )
        )  # libm: see _B_ABS
    return cases


def _to(arg, device: torch.device):
    if isinstance(arg, torch.Tensor):
        return arg.to(device)
    if isinstance(arg, torch.device):
        return device
    if isinstance(arg, list):
        return [_to(a, device) for a in arg]
    return arg


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _mismatch(got, wants, bounds, dtypes) -> str | None:
    """None when every output is within its bound, else what is wrong with the first that is not."""
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    if len(got) != len(wants):
        return f"returned {len(got)} outputs; expected {len(wants)}"
    for i, (g, want, bound, dtype) in enumerate(zip(got, wants, bounds, dtypes)):
        which = f"output {i}: " if len(wants) > 1 else ""
        if g.shape != want.shape or g.dtype != dtype:
            return f"{which}returned {g.dtype} {tuple(g.shape)}; expected {dtype} {tuple(want.shape)}"
        g = g.detach().float().cpu()
        bad = ~torch.isfinite(g)
        if bad.any():
            return f"{which}{int(bad.sum())} non-finite values (first at {tuple(bad.nonzero()[0].tolist())})"
        err = (g - want).abs()
        over = err > bound
        if over.any():
            at = tuple(int(i) for i in torch.unravel_index((err - bound).argmax(), want.shape))
            return (
                f"{which}|error| {float(err[at]):.3g} exceeds its rounding bound {float(bound[at]):.3g} at {at} "
                f"(got {float(g[at]):.6g}, expected {float(want[at]):.6g}); {int(over.sum())} of "
                f"{want.numel()} values out of bounds"
            )
    return None


def check_backend(fns: Mapping[str, Callable], device) -> dict[str, str]:
    """Run each op in `fns` (name -> a callable with the ``dfa_kernels::<name>`` schema) on
    `device` over the tiny cases: {op: "ok", or the first failure: the case and what went wrong}."""
    device = torch.device(device)
    results = {}
    for op, what, args, wants, bounds, dtypes in _cases():
        if op not in fns or results.get(op, OK) != OK:
            continue
        try:
            guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with guard, torch.no_grad():
                got = fns[op](*_to(args, device))
            wrong = _mismatch(got, wants, bounds, dtypes)
        except Exception as err:  # a kernel that crashes fails like one that computes wrong values
            wrong = _one_line(err)
        results[op] = OK if wrong is None else f"{what}: {wrong}"
    return results


# ---------------------------------------------------------------- the cache and the decision
def device_model(device: torch.device) -> tuple[str, str]:
    """(model name, compute capability) of a CUDA device; the processor for a CPU one."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"{major}.{minor}"
    return platform.processor() or platform.machine(), "-"


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def build_id() -> str:
    """What identifies the kernels that run: the compiled library, the Triton sources, the
    reference and these tests, by size and modification time (a rebuild or an edit re-tests)."""
    package = Path(__file__).resolve().parent
    library = getattr(sys.modules.get(f"{__package__}._C"), "__file__", None)
    files = (
        ([Path(library)] if library else [])
        + sorted((package / "triton").glob("*.py"))
        + [package / "reference.py", Path(__file__).resolve()]
    )
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_key(backend: str, device: torch.device) -> tuple[str, dict]:
    name, capability = device_model(device)
    fields = {
        "backend": backend,
        "device": name,
        "capability": capability,
        "dfa_kernels": _version("dfa-kernels"),
        "build": build_id(),
        "torch": torch.__version__,
        "triton": _version("triton"),
    }
    return "|".join(str(v) for v in fields.values()), fields


def _read(path: Path) -> dict:
    """The cached results ({} for a missing, unreadable, corrupt or older-format file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("results"), dict):
        return {}
    return data["results"]


def _valid(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("ops"), dict)
        and bool(entry["ops"])
        and all(isinstance(v, str) for v in entry["ops"].values())
    )


def _write(path: Path, key: str, entry: dict) -> None:
    results = _read(path)  # re-read: another process may have added its device since
    results[key] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": FORMAT, "results": results}, indent=1, sort_keys=True))
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except OSError as err:
        log.warning(
            "dfa_kernels: the self-test result could not be cached in %s (%s): it re-runs in each process", path, err
        )
        with contextlib.suppress(OSError):
            tmp.unlink()


# (device, backend) -> (the cache entry in effect in this process, why the backend may not run)
_decided: dict[tuple[str, str], tuple[dict, str | None]] = {}


def _decide(backend: str, device: torch.device, fns: Mapping[str, Callable]) -> dict:
    key, fields = cache_key(backend, device)
    path = cache_path()
    entry = _read(path).get(key)
    if _valid(entry) and set(entry["ops"]) >= set(fns):
        return entry
    start = time.perf_counter()
    ops = check_backend(fns, device)
    entry = {
        **fields,
        "ops": ops,
        "seconds": round(time.perf_counter() - start, 4),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not any(": OutOfMemoryError: " in why for why in ops.values()):  # a full GPU says nothing of the kernels
        _write(path, key, entry)
    return entry


def _failure(entry: dict) -> str | None:
    failed = [(op, why) for op, why in entry["ops"].items() if why != OK]
    if not failed:
        return None
    op, why = failed[0]
    more = f" (and {', '.join(o for o, _ in failed[1:])})" if len(failed) > 1 else ""
    return f"its self-test on {entry['device']} failed: {op}: {why}{more}"


def _indexed(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def problem(backend: str, device: str, fns: Callable[[], Mapping[str, Callable]]) -> str | None:
    """Why `backend` must not run on `device` by its self-test, None when it passed (or the test is
    off). Runs the test at the first call for (device, backend) in a process unless the disk cache
    has the result; `fns()` gives the backend's ops (see check_backend). Called at every op call:
    after the first, one environment read and one dict lookup."""
    if not enabled():
        return None
    memo = (device if ":" in device else _indexed(device), backend)
    if memo not in _decided:
        if memo[0].startswith("cuda") and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return None  # a test would break the capture (it copies to the host); it runs at the next use
        entry = _decide(backend, torch.device(memo[0]), fns())
        why = _failure(entry)
        why = why and f"{why} (cached in {cache_path()}: delete it to re-run the test; {ENV}=0 skips it)"
        _decided[memo] = entry, why
        if why:
            warnings.warn(
                f"dfa_kernels: the {backend!r} backend is not offered on {memo[0]}: {why}. backend='auto' "
                f"uses another backend there, and asking for {backend!r} raises",
                RuntimeWarning,
                stacklevel=2,
            )
    return _decided[memo][1]


def status(backend: str, device: str) -> str:
    """The self-test's result for (backend, device) in this process, as `dfa-kernels info` shows it."""
    if not enabled():
        return f"skipped ({ENV}=0)"
    entry, _ = _decided.get((_indexed(device), backend), (None, None))
    if entry is None:
        return "not run yet"
    why = _failure(entry)
    if why:
        return f"failed: {why.split(' failed: ', 1)[1]}"
    return f"passed ({len(entry['ops'])} ops in {entry['seconds'] * 1e3:.0f} ms on {entry['date']})"
