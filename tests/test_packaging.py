"""The package as it ships: one version, an sdist that holds what a source build needs, and a
compiled library that records the torch it was built against, so that under another torch it is
not loaded and the user reads the rebuild command instead of an undefined-symbol traceback.

CI also builds the wheel and the sdist, installs the wheel in a fresh venv and runs it from outside
the checkout (.ci/run)."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tomllib
import torch
from child_process import child_env

import dfa_kernels as dk
from dfa_kernels import ops

ROOT = Path(__file__).resolve().parents[1]


def test_one_version():
    """pyproject.toml reads the version from dfa_kernels/__init__.py; the installed metadata agrees."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dfa_kernels.__version__"}
    assert importlib.metadata.version("dfa-kernels") == dk.__version__, "reinstall: the metadata is stale"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{dk.__version__}]" in changelog or "## [Unreleased]" in changelog


def _source_files() -> list[str]:
    """The checkout's files as a fresh clone has them (tracked, plus new ones git does not ignore)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the sdist is built from a clone's files")
    return [f for f in listed if f and (ROOT / f).is_file()]


def test_sdist_holds_what_a_source_build_needs(tmp_path):
    """`python -m build --sdist` of a clean copy of the checkout: the C++/CUDA sources (the .inc
    bodies and the headers too), CMakeLists.txt, the package, its data, the license and the docs."""
    spec = importlib.util.find_spec("build")
    if spec is None or spec.origin is None:  # None: nothing, or only the checkout's build/ folder
        pytest.skip("the test extra installs build (pip install '.[test]')")
    files = _source_files()
    copy = tmp_path / "src"
    for name in files:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((ROOT / name).read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(copy)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "DFA_KERNELS_FORCE_CPU": "1"},
    )  # no nvcc probe: same file list
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sdist = tmp_path / f"dfa_kernels-{dk.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
        info = tar.extractfile(f"dfa_kernels-{dk.__version__}/PKG-INFO").read().decode()
    needed = [f for f in files if f.startswith(("csrc/", "dfa_kernels/", "requirements/"))]
    needed += [
        "CMakeLists.txt",
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "CONTRIBUTING.md",
    ]
    assert any(f.endswith(".inc") for f in needed) and any(f.startswith("csrc/include/") for f in needed)
    assert sorted(set(needed) - members) == []
    assert not [m for m in members if m.endswith((".so", ".pyc"))]
    assert f"Version: {dk.__version__}" in info and "License-Expression: MIT" in info


def test_the_library_records_the_torch_it_was_built_against():
    if ops._C is None:
        pytest.skip(f"the compiled library is not loaded: {ops._C_ERROR}")
    recorded = ops.recorded_torch_version(ops._C.__file__)
    assert recorded is not None, "the library predates the record: rebuild it (pip install --no-build-isolation -e .)"
    assert recorded == torch.__version__ == ops._C.build_config()["torch_version_built"]
    assert dk.build_info()["built_against_torch"] == torch.__version__


def test_the_reader_finds_no_record_where_there_is_none(tmp_path):
    libc10 = next((Path(torch.__file__).parent / "lib").glob("libc10.so*"), None)
    if libc10 is not None:
        assert ops.recorded_torch_version(libc10) is None  # an ELF library without the section
    assert ops.recorded_torch_version(ROOT / "setup.py") is None  # not ELF
    (tmp_path / "short").write_bytes(b"\x7fELF")
    assert ops.recorded_torch_version(tmp_path / "short") is None


def test_a_library_of_another_torch_is_not_loaded():
    """A running torch other than the recorded one (simulated: torch.__version__ patched before the
    import): the library is not loaded, one warning names both versions and the rebuild command,
    the plain-PyTorch backend still runs, and `dfa-kernels info` says the same."""
    if ops._C is None or ops.recorded_torch_version(ops._C.__file__) is None:
        pytest.skip("needs a loaded library that records its torch")
    code = (
        "import sys, torch\ntorch.__version__ = '2.5.0+cpu'\nimport dfa_kernels as dk\n"
        "assert 'dfa_kernels._C' not in sys.modules\n"
        "print(dk.available_backends('cpu'), dk.project(torch.randn(2, 3), dk.FeedbackSpec(3, [5])).shape)\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "from dfa_kernels.cli import main; main(['info'])\n"
    )
    env = child_env()  # the dfa_kernels (and so the library) this process loaded, not the checkout's
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    built = ops.recorded_torch_version(ops._C.__file__)
    said = f"dfa_kernels._C was built against torch {built}, running torch 2.5.0+cpu, so it was not loaded"
    assert done.stderr.count("RuntimeWarning: dfa_kernels: ") == 1 and said in done.stderr
    # the command for this kind of install: -e of the checkout, or from source for a wheel in site-packages
    assert f"Fix: rebuild it against this torch: {ops._rebuild_command()}" in done.stderr
    assert "ImportError" not in done.stderr and "Traceback" not in done.stderr
    assert "['torch'] torch.Size([2, 5])" in done.stdout
    warning = [line for line in done.stdout.splitlines() if line.startswith("WARNING: ")]
    assert len(warning) == 1 and said in warning[0]


def test_the_rebuild_command_of_an_installed_copy(monkeypatch, tmp_path):
    """Outside a checkout (a wheel in site-packages) the fix rebuilds from source, not the same wheel."""
    monkeypatch.setattr(ops, "__file__", str(tmp_path / "site-packages" / "dfa_kernels" / "ops.py"))
    message = ops._fallback_message(f"built against torch 2.5.0+cpu, running torch {torch.__version__}")
    assert "--no-binary dfa-kernels" in message and "install the torch it was built against" in message
