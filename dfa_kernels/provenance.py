"""Where a result came from: the git SHA, the exact command, the library versions and the machine.

Every result file the zoo, the studies and the benchmarks write carries :func:`provenance` (and
benchmarks their :func:`git_sha`), so a number in the README can be traced to the code and the
command that produced it.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

# the libraries whose versions can change a result
LIBRARIES = ("dfa-kernels", "torch", "triton", "numpy", "scipy", "scikit-learn", "torch_geometric",
             "transformers", "tokenizers")


def git_sha() -> str | None:
    """HEAD of the checkout the code runs from (the working directory, else this package's own
    folder when it is an editable install), "-dirty" when tracked files changed; None outside git."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=where)
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=where).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            continue
        return out.stdout.strip() + ("-dirty" if dirty else "")
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


def provenance() -> dict:
    """{git_sha, command, date, versions, machine, torch_threads} of the current process."""
    import torch
    return {"git_sha": git_sha(), "command": command(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".replace("  ", " "),
            "torch_threads": torch.get_num_threads()}
