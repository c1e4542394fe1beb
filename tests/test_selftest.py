"""The GPU backends' self-test (dfa_kernels.selftest): it catches a broken kernel, records the
failure on disk, warns once, and the backend is no longer offered on that device. Without a GPU the
device is simulated and the kernels under test are the CPU ones, some made to fail."""

import json
import logging
import warnings

import pytest
import torch

from dfa_kernels import FeedbackSpec, ops, selftest
from dfa_kernels.cli import main

pytestmark = pytest.mark.skipif(ops._C is None, reason="the compiled library is not loaded")
REAL_GPU = torch.cuda.is_available()


def _fns(backend="cpu", **broken):
    return {**{name: ops._op(backend, name) for name in ops._OPS}, **broken}


def _wrong(op, how):
    """op's CPU kernel, broken in one of the ways a GPU kernel goes wrong."""

    def run(*args):
        if how == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        outs = op(*args)
        for out in [outs] if isinstance(outs, torch.Tensor) else outs:
            if how == "last column":  # a tile that skipped the ragged edge
                out[..., -1] = 0
            elif how == "scaled":  # 3% off: far above rounding in fp32
                out.mul_(1.03)
            elif how == "nan":
                out.view(-1)[0] = float("nan")
        return outs

    return run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh process as far as the self-test knows, with its cache in tmp_path."""
    monkeypatch.setenv("DFA_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DFA_KERNELS_SELF_TEST", raising=False)
    monkeypatch.setattr(selftest, "_decided", {})
    return tmp_path / "selftest.json"


def _counted(fns):
    calls = []

    def wrap(name, fn):
        def run(*args):
            calls.append(name)
            return fn(*args)

        return run

    return {name: wrap(name, fn) for name, fn in fns.items()}, calls


# ---------------------------------------------------------------- the test itself
def test_every_op_has_tiny_cases():
    """Every op is tested, on shapes small enough for milliseconds on a GPU."""
    cases = selftest._cases()
    assert {op for op, *_ in cases} == set(ops._OPS)
    for op, what, args, wants, *_ in cases:
        tensors = [a for arg in args for a in (arg if isinstance(arg, list) else [arg]) if isinstance(a, torch.Tensor)]
        assert max(t.numel() for t in tensors + wants) <= 2048, (op, what)


def test_the_cpu_kernels_pass():
    assert selftest.check_backend(_fns(), "cpu") == {name: "ok" for name in ops._OPS}


def test_triton_passes_but_for_bf16_dot_under_the_interpreter():
    """The bounds accept correct Triton kernels (fp32 and fp16 cases); the interpreter's bf16
    tl.dot is known to be wrong (test_project skips it), and the self-test sees it."""
    if "triton" not in ops.available_backends("cpu"):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    results = selftest.check_backend(_fns("triton"), "cpu")
    assert set(results) == set(ops._OPS)
    for op, result in results.items():
        assert result == "ok" or "bf16" in result.split(": ")[0].split(), (op, result)  # the failing case's dtype


@pytest.mark.parametrize(
    "how,message",
    [
        ("last column", "exceeds its rounding bound"),
        ("scaled", "exceeds its rounding bound"),
        ("nan", "non-finite values"),
        ("raises", "RuntimeError: CUDA error: an illegal memory access"),
    ],
)
@pytest.mark.parametrize("op", ops._OPS)
def test_a_broken_op_fails(op, how, message):
    results = selftest.check_backend(_fns(**{op: _wrong(ops._op("cpu", op), how)}), "cpu")
    assert message in results[op], results[op]
    assert all(result == "ok" for name, result in results.items() if name != op), results


def test_a_wrong_dtype_fails():
    wrong = _fns(project=lambda *args: ops._op("cpu", "project")(*args).float())
    assert (
        "returned torch.float32 (1, 37); expected torch.bfloat16 (1, 37)"
        in selftest.check_backend(wrong, "cpu")["project"]
    )


# ---------------------------------------------------------------- the decision and its cache
def test_a_failing_backend_warns_once_and_is_cached(cache):
    fns, calls = _counted(_fns(project_points=_wrong(ops._op("cpu", "project_points"), "scaled")))
    with pytest.warns(
        RuntimeWarning,
        match=r"the 'broken' backend is not offered on cpu: its self-test on .* "
        r"failed: project_points: N=7 K=3 .*exceeds its rounding bound",
    ):
        problem = selftest.problem("broken", "cpu", lambda: fns)
    assert problem.startswith("its self-test on ") and f"cached in {cache}" in problem
    ran = len(calls)
    assert ran >= len(ops._OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert selftest.problem("broken", "cpu", lambda: fns) == problem
    assert selftest.status("broken", "cpu").startswith("failed: project_points: N=7 K=3")

    saved = json.loads(cache.read_text())
    key, fields = selftest.cache_key("broken", torch.device("cpu"))
    assert saved["format"] == selftest.FORMAT and list(saved["results"]) == [key]
    entry = saved["results"][key]
    assert {k: entry[k] for k in fields} == fields and entry["ops"]["project"] == "ok"
    assert "exceeds its rounding bound" in entry["ops"]["project_points"]

    selftest._decided.clear()  # the next process: the failure is read back, and still warned about
    with pytest.warns(RuntimeWarning, match="project_points"):
        assert selftest.problem("broken", "cpu", lambda: fns) == problem
    assert len(calls) == ran


def test_a_passing_result_is_reused_until_the_build_changes(cache, monkeypatch):
    fns, calls = _counted(_fns())
    assert selftest.problem("good", "cpu", lambda: fns) is None
    assert selftest.status("good", "cpu").startswith("passed (5 ops in ")
    ran = len(calls)
    selftest._decided.clear()
    assert selftest.problem("good", "cpu", lambda: fns) is None and len(calls) == ran
    monkeypatch.setattr(selftest, "build_id", lambda: "rebuilt")
    selftest._decided.clear()
    assert selftest.problem("good", "cpu", lambda: fns) is None and len(calls) == 2 * ran
    assert len(json.loads(cache.read_text())["results"]) == 2


def test_switched_off(cache, monkeypatch):
    monkeypatch.setenv("DFA_KERNELS_SELF_TEST", "0")
    fns, calls = _counted(_fns(project=_wrong(ops._op("cpu", "project"), "nan")))
    assert selftest.problem("broken", "cpu", lambda: fns) is None
    assert calls == [] and not cache.exists()
    assert selftest.status("broken", "cpu") == "skipped (DFA_KERNELS_SELF_TEST=0)"


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 0, "results": {}}', "entry"])
def test_a_corrupt_cache_is_ignored_and_rewritten(cache, content):
    key, _ = selftest.cache_key("good", torch.device("cpu"))
    if content == "entry":  # the right key, a value that is not a result
        content = json.dumps({"format": selftest.FORMAT, "results": {key: {"ops": "passed"}}})
    cache.write_text(content)
    fns, calls = _counted(_fns())
    assert selftest.problem("good", "cpu", lambda: fns) is None
    assert calls
    assert json.loads(cache.read_text())["results"][key]["ops"] == {name: "ok" for name in ops._OPS}


def test_out_of_memory_is_not_cached(cache):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    with pytest.warns(RuntimeWarning, match="grouped_weight_grad: .*OutOfMemoryError"):
        assert selftest.problem("full", "cpu", lambda: _fns(grouped_weight_grad=oom))
    assert not cache.exists()  # a full GPU says nothing of the kernels: the next process re-tests


def test_an_unwritable_cache_only_costs_a_rerun(cache, monkeypatch, caplog):
    cache.write_text("")
    monkeypatch.setenv("DFA_KERNELS_CACHE_DIR", str(cache))  # a file where the folder should be
    with caplog.at_level(logging.WARNING, logger="dfa_kernels"):
        assert selftest.problem("good", "cpu", lambda: _fns()) is None
    assert "could not be cached" in caplog.text


def test_not_run_while_a_cuda_graph_is_captured(cache, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fns, calls = _counted(_fns())
    assert selftest.problem("cuda", "cuda:0", lambda: fns) is None
    assert calls == [] and selftest.status("cuda", "cuda:0") == "not run yet"


# ---------------------------------------------------------------- where ops decides availability
@pytest.fixture
def fake_gpu(cache, monkeypatch):
    """ops sees one GPU, "Fake GPU" of compute capability 9.0, where Triton can run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ops, "_cuda_arch_check", lambda index: None)
    monkeypatch.setattr(ops, "_triton_available", lambda device_type: True)
    return [b for b in selftest.GPU_BACKENDS if b in ops._runnable_backends(torch.device("cuda:0"))]


def _check_on_cpu(monkeypatch, broken_in_triton=None):
    """Make the hook's check_backend run the CPU kernels in place of the GPU backend it was given
    (Triton's `broken_in_triton` op made wrong); returns the (device, backend) of each run."""
    real, runs = selftest.check_backend, []

    def check(fns, device):
        assert set(fns) == set(ops._OPS)
        backend = "triton" if fns["project"] is torch.ops.dfa_kernels.triton_project else "cuda"
        assert fns["project"] is ops._op(backend, "project")
        runs.append((str(device), backend))
        broken = (
            {broken_in_triton: _wrong(ops._op("cpu", broken_in_triton), "last column")}
            if backend == "triton" and broken_in_triton
            else {}
        )
        return real(_fns(**broken), "cpu")

    monkeypatch.setattr(selftest, "check_backend", check)
    return runs


def test_a_gpu_backend_failing_one_op_is_not_offered(fake_gpu, monkeypatch, capsys):
    runs = _check_on_cpu(monkeypatch, broken_in_triton="project_points")
    with pytest.warns(
        RuntimeWarning,
        match=r"the 'triton' backend is not offered on cuda:0: its self-test on Fake "
        r"GPU failed: project_points: .*exceeds its rounding bound",
    ):
        available = ops.available_backends("cuda:0")
    passing = [b for b in fake_gpu if b != "triton"]
    assert available == passing + ["torch"]
    assert sorted(runs) == sorted(("cuda:0", b) for b in fake_gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.available_backends("cuda:0") == available and len(runs) == len(fake_gpu)
        with pytest.raises(
            RuntimeError,
            match=r"backend 'triton' is not available on device cuda:0 \(its self-test "
            r"on Fake GPU failed: project_points: .*DFA_KERNELS_SELF_TEST=0",
        ):
            ops.resolve_backend("triton", "cuda:0")
        for op in ("project", "project_points"):
            assert ops.resolve_backend("auto", "cuda:0", op, "virtual", 3) == available[0]

        info = ops.build_info()
    assert info["self_test"]["cuda:0"]["triton"].startswith("failed: project_points: N=7 K=3")
    for b in passing:
        assert info["self_test"]["cuda:0"][b].startswith("passed (5 ops in ")
    assert any("the 'triton' backend is not offered" in w for w in info["warnings"])
    main(["info"])
    out = capsys.readouterr().out
    assert "cuda:0 triton: failed: project_points: N=7 K=3" in out
    assert ("cuda:0 cuda: passed (5 ops in " in out) == ("cuda" in passing)


@pytest.mark.skipif(REAL_GPU, reason="needs a machine where the CUDA kernels cannot run")
def test_a_crashing_gpu_backend_is_not_offered(fake_gpu):
    """The real path: the GPU ops run on a GPU that is not there, raise, and are refused."""
    with pytest.warns(RuntimeWarning, match=r"its self-test on Fake GPU failed: project: .*RuntimeError"):
        assert ops.available_backends("cuda:0") == ["torch"]
    assert ops.resolve_backend("auto", "cuda:0", "project", "virtual", 17) == "torch"
    entries = json.loads(selftest.cache_path().read_text())["results"].values()
    assert sorted(entry["backend"] for entry in entries) == fake_gpu
    assert all(entry["device"] == "Fake GPU" and entry["capability"] == "9.0" for entry in entries)


def test_switched_off_on_a_gpu(fake_gpu, monkeypatch, capsys):
    monkeypatch.setenv("DFA_KERNELS_SELF_TEST", "0")
    runs = _check_on_cpu(monkeypatch)
    assert ops.available_backends("cuda:0") == fake_gpu + ["torch"] and runs == []
    main(["info"])
    out = capsys.readouterr().out
    assert "cuda:0 triton: skipped (DFA_KERNELS_SELF_TEST=0)" in out and not selftest.cache_path().exists()


def test_never_on_a_cpu_device(cache, monkeypatch):
    runs = _check_on_cpu(monkeypatch)
    ops.available_backends("cpu")
    ops.project(torch.randn(2, 3), FeedbackSpec(3, [5]))
    assert runs == [] and not selftest.cache_path().exists()


@pytest.mark.skipif(not REAL_GPU, reason="needs a CUDA GPU")
def test_the_gpu_backends_pass_on_this_gpu():
    for backend in selftest.GPU_BACKENDS:
        if backend in ops._runnable_backends(torch.device("cuda")):
            assert selftest.check_backend(_fns(backend), "cuda") == {name: "ok" for name in ops._OPS}, backend
