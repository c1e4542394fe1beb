"""provenance.git_sha names the code that runs: the checkout it is imported from, or for an installed
copy the commit setup.py recorded when building it, never the working directory's checkout."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from child_process import child_env

import dfa_kernels as dk

ROOT = Path(__file__).resolve().parents[1]


def _sha_seen_by(package_parent: Path, cwd: Path) -> str:
    code = "import dfa_kernels.provenance as p; print(p.git_sha())"
    env = child_env(package_parent)
    env["PYTHONPATH"] = str(package_parent)  # this copy only
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_an_installed_copy_reports_the_commit_it_was_built_from(tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(
        Path(dk.__file__).parent,
        copy / "dfa_kernels",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_source.json"),
    )
    (copy / "dfa_kernels" / "_source.json").write_text('{"git_sha": "0123abc"}\n')
    # run from inside a git checkout whose HEAD is something else: it is not consulted
    assert _sha_seen_by(copy, cwd=ROOT) == "0123abc"
    (copy / "dfa_kernels" / "_source.json").unlink()
    assert _sha_seen_by(copy, cwd=ROOT) == "None"


def test_a_checkout_reports_its_head(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("the tests do not run from a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert _sha_seen_by(ROOT, cwd=tmp_path).startswith(head)
