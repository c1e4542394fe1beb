"""The environment for the tests' child Python processes. A module of its own, not conftest: the
distributed tests' spawned workers import the test modules, and conftest may only run first."""

import os
from pathlib import Path

import dfa_kernels as dk


def child_env(*extra_paths, **variables) -> dict:
    """The environment for a child Python process that must import the dfa_kernels this process
    imported (after `pip install .` the installed one, whose compiled library the checkout's sources
    lack): its folder goes first on PYTHONPATH, and PYTHONSAFEPATH keeps the working directory (a
    checkout) from going in front of it. `extra_paths` follow it (e.g. the checkout, for
    `benchmarks`)."""
    package_root = str(Path(dk.__file__).resolve().parents[1])
    env = {**os.environ, **variables, "PYTHONSAFEPATH": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, *map(str, extra_paths), env.get("PYTHONPATH")]))
    return env
