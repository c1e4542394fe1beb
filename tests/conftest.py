import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter. The variable is
# read when triton is imported, so it is set here, before any test imports dfa_kernels.triton.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before conftest could enable its interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dfa_kernels as dk  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def backend_device_pairs():
    """Every (backend, device) that runs here; CUDA ones appear only with a GPU (see test_gpu_visible)."""
    return [(b, d) for d in DEVICES for b in dk.available_backends(d)]


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module of tiny models: on a busy 2-core machine the thread pool's
    barriers made them up to 10x slower; the setting is restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
