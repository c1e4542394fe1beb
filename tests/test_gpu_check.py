"""scripts/gpu_check.sh, the one command a lent GPU runs, in its dry-run mode on this CPU: every
stage's logic at tiny sizes, the summary written and printed; a stage that fails or runs out of
time is recorded and the summary still comes out."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(out: Path, *args, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OUT": str(out), **env}
    environ.pop("TRITON_INTERPRET", None)  # the script's own tests decide
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, cwd=ROOT,
                          timeout=900)


def test_dry_run_runs_every_stage_and_summarises(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["git_sha"]
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [
        (name, "ok") for name in ("build", "tests", "sync", "projection", "step")]
    assert summary["tests"]["collected"] > 100 and summary["sync"]["failed"] == 0
    assert summary["projection"]["rows"] > 0 and set(summary["step"]["workloads"]) == {"mlp", "dcn"}
    for name in ("build_info.json", "projection_cpu_tiny.json", "step_cpu.json", "step_cpu.png", "tests.log"):
        assert (tmp_path / name).exists(), name
    assert "=== gpu_check summary (dry run, CPU" in done.stdout


def test_a_stage_out_of_time_is_recorded_and_the_summary_still_printed(tmp_path):
    # the step stage gets 1 s: less than starting Python and importing torch takes
    done = _run(tmp_path, "--dry-run", "step", GPU_CHECK_SCALE="0.001", GPU_CHECK_MIN_LIMIT="1")
    assert done.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [("step", "timeout")]
    assert "stage step       timeout" in done.stdout


def test_unknown_argument():
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown argument" in done.stderr
