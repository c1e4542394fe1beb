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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
