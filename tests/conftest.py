import os
import sys

import torch

# Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter. The variable is
# read when triton is imported, so it is set here, before any test imports dfa_kernels.triton.
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before conftest could enable its interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dfa_kernels as dk  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
