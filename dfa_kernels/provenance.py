"""Where a result came from: the git SHA, the exact command, the library versions and the machine.

Every result file the zoo, the studies and the benchmarks write carries :func:`provenance` (and
benchmarks their :func:`git_sha`), so a number in the README can be traced to the code and the
command that produced it.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# the libraries whose versions can change a result
LIBRARIES = (
    "dfa-kernels",
    "torch",
    "triton",
    "numpy",
    "scipy",
    "scikit-learn",
    "torch_geometric",
    "transformers",
    "tokenizers",
)


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the code that runs: the checkout this package is imported from (a source tree
    or an editable install), "-dirty" when its tracked files changed; for an installed copy, the
    commit it was built from (setup.py records it); None when neither is known. The working
    directory's checkout is not consulted: the code that runs may not come from it. Read once per
    process: the code was loaded when it started."""
    package = Path(__file__).resolve().parent
    try:  # the package's own files tracked by git: a checkout
        subprocess.run(
            ["git", "ls-files", "--error-unmatch", "__init__.py"], capture_output=True, check=True, cwd=package
        )
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=package
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=package
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        return json.loads((package / "_source.json").read_text()).get("git_sha")
    except (OSError, ValueError):
        return None


# Set by the `dfa-kernels` entry point to the command it runs (also when called as cli.main(argv)).
CLI_COMMAND: str | None = None


def command() -> str:
    """The command that made this result: the `dfa-kernels` command line being run, else this
    process's command line as a shell would take it back."""
    if CLI_COMMAND is not None:
        return CLI_COMMAND
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("dfa-kernels", "__main__.py"):
        argv[0] = "dfa-kernels" if Path(argv[0]).name == "dfa-kernels" else f"python -m {__package__}"
    elif argv and argv[0].endswith(".py"):
        argv[0] = f"python {os.path.relpath(argv[0])}"
    return " ".join(shlex.quote(a) if i else a for i, a in enumerate(argv))


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) Platinum 8481C"), from /proc/cpuinfo on
    Linux, else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi), None without one."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def machine() -> dict:
    """What measured a result: the CPU model, its cores, the CPU kernels' instruction-set path, torch's
    threads, and the GPU and its driver when one is visible."""
    import torch

    from . import ops

    found = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_isa": ops.cpu_isa(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        found.update(gpu=torch.cuda.get_device_name(0), gpu_driver=gpu_driver())
    return found


def provenance() -> dict:
    """{git_sha, command, date, versions, machine, torch_threads} of the current process."""
    import torch

    return {
        "git_sha": git_sha(),
        "command": command(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
    }
