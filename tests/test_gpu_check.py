"""scripts/gpu_check.sh, the one 600-second command of a first GPU run, in its dry-run mode on this
CPU: every stage's logic at tiny sizes (the tests collected, not run), the summary written and
printed. What a GPU run sends back is limited (8 files in $OUT, 2 folders down, the last 12,000
characters of output), so the dry run fails when the run would break those limits or its scaled
time budget, and must leave nothing in the checkout. Also: the subset rules of tests/gpu_subset.txt
(tests/conftest.py) and the summary's reading of pytest logs, with and without pytest-xdist."""

import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import read_gpu_subset, rule_matches, select_gpu_subset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["preflight", "build", "tests", "step", "lm", "projection"]
OUT_FILES = {"summary.json", "summary.txt", "gpu_check.tar.gz"}


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *args, root: Path = ROOT, **env) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    environ = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), **env}
    environ.pop("TRITON_INTERPRET", None)  # the script's own pytest run decides
    environ.pop("PYTHONDONTWRITEBYTECODE", None)  # and the script keeps its Python from writing bytecode
    return subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=root,
        timeout=900,
    )


def _git(cwd: Path, *args) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def _snapshot(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) committed in a fresh repository:
    the dry run's writes show in its `git status` alone, whatever else edits the real checkout."""
    for name in _git(ROOT, "ls-files", "-co", "--exclude-standard").splitlines():
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "snapshot")
    return dest


def test_dry_run_runs_every_stage_within_budget_and_leaves_three_files(tmp_path):
    checkout = _snapshot(tmp_path / "checkout")
    done = _run(tmp_path, "--dry-run", root=checkout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    # untracked, modified or ignored (a stray __pycache__ or .pytest_cache counts): nothing
    left = _git(checkout, "status", "--porcelain", "--ignored", "--untracked-files=all")
    assert not left, f"the dry run left files in the checkout: {left[:2000]}"
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == OUT_FILES  # what comes back: 3 files of the 8 allowed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["git_sha"]
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [(name, "ok") for name in STAGES]
    assert summary["elapsed_s"] <= summary["budget_s"]
    tests = summary["tests"]
    assert tests["collected_only"] and tests["selected"] >= 400, tests  # 512 on a CPU today, ~860 on a GPU
    assert tests["subset_problems"] == [], tests["subset_problems"]  # every rule names real tests and parameters
    assert set(summary["step"]["step"]["workloads"]) == {"mlp", "dcn"}
    assert set(summary["step"]["lm"]["workloads"]) == {"lm_micro"}
    assert summary["projection"]["rows"] > 0 and not summary["projection"]["failed"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {
        "stages.jsonl",
        "versions.json",
        "build_info.json",
        "tests.log",
        "step_mlp_dcn.json",
        "step_lm.json",
        "projection_cpu_quick.json",
        "summary.txt",
        "preflight.log",
    } <= names, names
    # the summary alone must fit the 12,000 characters of output that come back
    text = done.stdout[done.stdout.index("=== gpu_check summary (dry run, CPU") :]
    assert len(text) < 12_000 and "verdict: every stage passed" in text and "BUDGET:" in text
    assert (out / "summary.txt").read_text() in done.stdout


def test_a_stage_out_of_time_is_recorded_and_the_summary_still_printed(tmp_path):
    # the step stage gets 1 s: less than starting Python and importing torch takes
    done = _run(tmp_path, "--dry-run", "step", GPU_CHECK_SCALE="0.001", GPU_CHECK_MIN_LIMIT="1")
    assert done.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(s["stage"], s["status"], s["rc"]) for s in summary["stages"]] == [("step", "timeout", 124)]
    assert "step       TIMEOUT" in done.stdout and "NOT passed: step" in done.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUT_FILES


def test_a_run_over_its_budget_fails(tmp_path):
    # stage limits floored at 30 s, so the stage passes, but the budget (x0.001 of 50 s) is 0 s
    done = _run(tmp_path, "--dry-run", "preflight", GPU_CHECK_SCALE="0.001", GPU_CHECK_MIN_LIMIT="30")
    assert done.returncode == 1, done.stdout[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [("preflight", "ok")]
    assert "over the budget of 0 s" in done.stdout


@pytest.mark.parametrize("extra,ok", [(5, True), (6, False)])
def test_stray_files_in_out_trip_the_guard(tmp_path, extra, ok):
    """A stage writing into $OUT (simulated): 3 + 5 files still come back, 3 + 6 do not."""
    done = _run(tmp_path, "--dry-run", "preflight", GPU_CHECK_EXTRA_OUT_FILES=str(extra))
    assert len(list((tmp_path / "out").iterdir())) == 3 + extra
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-2000:]
    assert ("OUT GUARD FAILED" in done.stdout) != ok
    if not ok:
        assert "9 files in" in done.stderr and "more than the 8 that come back" in done.stderr


def _check_out(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--check-out", str(folder)], capture_output=True, text=True)


def test_the_guard_on_a_folder(tmp_path):
    ok = tmp_path / "ok"
    (ok / "a" / "b").mkdir(parents=True)
    for i in range(6):
        (ok / f"f{i}.json").write_text("{}")
    (ok / "a" / "g.txt").write_text("x")
    (ok / "a" / "b" / "h.txt").write_text("x")  # $OUT/a/b/file: 2 folders down, comes back
    assert _check_out(ok).returncode == 0
    (ok / "one_too_many.txt").write_text("x")
    done = _check_out(ok)
    assert done.returncode == 1 and "9 files" in done.stderr
    deep = tmp_path / "deep"
    (deep / "a" / "b" / "c").mkdir(parents=True)
    (deep / "a" / "b" / "c" / "x.txt").write_text("x")  # 3 folders down: does not come back
    done = _check_out(deep)
    assert done.returncode == 1 and "more than 2 folders down" in done.stderr
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "a b.txt").write_text("x")
    done = _check_out(odd)
    assert done.returncode == 1 and "names the transfer refuses" in done.stderr
    link = tmp_path / "link"
    link.mkdir()
    (link / "x").symlink_to(SCRIPT)
    assert _check_out(link).returncode == 1


def test_out_must_be_empty_and_arguments_are_checked(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 2 and "not empty" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown argument" in done.stderr


# ---------------------------------------------------------------- the subset rules (tests/conftest.py)
def _item(nodeid, **params):
    return SimpleNamespace(nodeid=nodeid, callspec=SimpleNamespace(params=params) if params else None)


def test_subset_rules_select_in_rule_order_and_report_problems(tmp_path):
    rules_file = tmp_path / "subset.txt"
    rules_file.write_text(
        "# first the graph test\n"
        "tests/a.py::test_graph\n"
        "tests/b.py::test_op  device=cuda  shape=(7,3,128)|(1,1,1)   # two shapes\n"
        "tests/b.py::test_*  dtype=torch.float16\n"
    )
    rules = read_gpu_subset(rules_file)
    assert rules[1] == ("tests/b.py::test_op", {"device": ["cuda"], "shape": ["(7,3,128)", "(1,1,1)"]})
    import torch

    items = [
        _item("tests/b.py::test_op[a]", device="cuda", shape=(7, 3, 128), dtype=torch.float32),
        _item("tests/b.py::test_op[b]", device="cpu", shape=(7, 3, 128), dtype=torch.float32),
        _item("tests/b.py::test_op[c]", device="cuda", shape=(2, 2, 2), dtype=torch.float16),
        _item("tests/b.py::test_other[d]", dtype=torch.bfloat16),
        _item("tests/a.py::test_graph"),
        _item("tests/c.py::test_unrelated"),
    ]
    assert rule_matches(rules[1], items[0].nodeid, items[0].callspec.params)
    assert not rule_matches(rules[1], items[1].nodeid, items[1].callspec.params)
    selected, deselected, counts, problems = select_gpu_subset(rules, items)
    assert [i.nodeid for i in selected] == [
        "tests/a.py::test_graph",
        "tests/b.py::test_op[a]",
        "tests/b.py::test_op[c]",
    ]
    assert {i.nodeid for i in deselected} == {
        "tests/b.py::test_op[b]",
        "tests/b.py::test_other[d]",
        "tests/c.py::test_unrelated",
    }
    assert counts == [1, 1, 1] and problems == []
    stale = [("tests/a.py::test_renamed", {}), ("tests/b.py::test_op", {"dvice": ["cuda"]})]
    assert select_gpu_subset(stale, items)[3] == [
        "tests/a.py::test_renamed: matches no collected test",
        "tests/b.py::test_op: no such parameter 'dvice'",
    ]
    rules_file.write_text("tests/a.py::test_graph device\n")
    with pytest.raises(pytest.UsageError, match="not name=glob"):
        read_gpu_subset(rules_file)


def test_the_subset_file_parses():
    rules = read_gpu_subset(ROOT / "tests" / "gpu_subset.txt")
    assert rules[0][0] == "tests/test_sync_free.py::test_gpu_step_captured_in_a_cuda_graph"  # graphs first
    files = {test.split("::")[0] for test, _ in rules}
    assert all((ROOT / f).exists() for f in files), files


# ---------------------------------------------------------------- reading pytest logs
XDIST_CUT = """\
created: 8/8 workers
8 workers [6 items]

scheduling tests via LoadScheduling

tests/test_a.py::test_ok[(7, 3, 128)-cuda]
[gw0] [ 16%] PASSED tests/test_a.py::test_ok[(7, 3, 128)-cuda]
tests/test_a.py::test_fail
tests/test_a.py::test_hang
[gw1] [ 33%] FAILED tests/test_a.py::test_fail
tests/test_a.py::test_skip
[gw1] [ 50%] SKIPPED tests/test_a.py::test_skip
tests/test_a.py::test_crash
[gw2] node down: Not properly terminated
[gw2] [ 66%] FAILED tests/test_a.py::test_crash
replacing crashed worker gw2
worker 'gw2' crashed while running 'tests/test_a.py::test_crash'
=========================== short test summary info ============================
FAILED tests/test_a.py::test_fail - AssertionError: Tensor-likes are not close!
FAILED tests/test_a.py::test_crash - worker 'gw2' crashed while running 'te...
SKIPPED [1] tests/test_a.py:5: CUDA kernel tests need a GPU (none visible)
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!! KeyboardInterrupt !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
==================== 2 failed, 1 passed, 1 skipped in 8.37s ====================
"""
PLAIN_KILLED = """\
collected 9 items / 5 deselected / 4 selected

tests/test_a.py::test_ok[(1, 1, 1)] PASSED                               [ 25%]
tests/test_a.py::test_skip SKIPPED (CUDA kernel tests need a GPU ...)    [ 50%]
tests/test_a.py::test_err ERROR                                          [ 75%]
tests/test_a.py::test_hang
"""


def test_the_summary_reads_xdist_and_plain_logs_complete_or_cut():
    read = _summary_module().test_results
    r = read(XDIST_CUT)
    assert (r["selected"], r["passed"], r["failed"], r["skipped"], r["not_run"]) == (6, 1, 2, 1, 2)
    assert r["interrupted"] and r["final_line"] == "2 failed, 1 passed, 1 skipped in 8.37s"
    assert r["running_when_cut"] == ["tests/test_a.py::test_hang"]
    failures = {f["id"]: f["message"] for f in r["failures"]}
    assert failures["tests/test_a.py::test_fail"] == "AssertionError: Tensor-likes are not close!"
    assert failures["tests/test_a.py::test_crash"].startswith("worker gw2 crashed")
    assert r["skip_reasons"][0]["reason"] == "CUDA kernel tests need a GPU (none visible)"
    r = read(PLAIN_KILLED)  # killed (SIGKILL): no summary at all
    assert (r["selected"], r["passed"], r["skipped"], r["error"], r["not_run"]) == (4, 1, 1, 1, 1)
    assert r["running_when_cut"] == ["tests/test_a.py::test_hang"] and r["interrupted"]
    assert r["final_line"].startswith("none: cut by the time limit")


def test_the_printed_summary_fits_what_comes_back_however_many_failures(tmp_path, capsys):
    """300 failing tests with long ids: the printed summary stays under 10,000 characters (the device
    sends back the last 12,000 of output), lists as many ids as fit, and summary.json has them all."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "stages.jsonl").write_text(
        json.dumps({"stage": "tests", "status": "failed", "rc": 1, "seconds": 90, "limit_s": 150, "base_s": 150}) + "\n"
    )
    ids = [f"tests/test_compiled.py::test_project_matches_reference[{'x' * 120}-{i}-cuda]" for i in range(300)]
    log = ["8 workers [300 items]"] + [f"[gw{i % 8}] [ 50%] FAILED {t}" for i, t in enumerate(ids)]
    log += ["=========================== short test summary info ============================"]
    log += [f"FAILED {t} - AssertionError: Tensor-likes are not close! {'y' * 200}" for t in ids]
    log += ["============================ 300 failed in 80.00s ============================="]
    (work / "tests.log").write_text("\n".join(log) + "\n")
    assert _summary_module().main([str(work)]) == 1
    text = capsys.readouterr().out
    assert len(text) <= 10_000 and "more (summary.json, tests.log)" in text and "300 failed" in text
    assert "NOT passed: tests" in text
    assert len(json.loads((work / "summary.json").read_text())["tests"]["failures"]) == 300
