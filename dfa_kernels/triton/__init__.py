"""Triton backend: the feedback projections (virtual and materialized B, per point with the fused
activation derivative), the grouped weight gradient, and B itself.

Importing this package never fails for lack of Triton; ``is_available`` then answers False and
the kernel entry points are absent.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError:
    _HAVE_TRITON = False
else:
    _HAVE_TRITON = True
    from .grouped_gemm import grouped_weight_grad
    from .project import feedback_matrix, project, project_materialized
    from .project_points import project_points
    from .tuning import INTERPRET

__all__ = [
    "is_available",
    "project",
    "project_materialized",
    "project_points",
    "grouped_weight_grad",
    "feedback_matrix",
]


def is_available(device_type: str) -> bool:
    """Whether the Triton kernels run on tensors of ``device_type``: "cuda" when compiled for a
    present GPU, "cpu" when triton was imported under TRITON_INTERPRET=1."""
    if not _HAVE_TRITON:
        return False
    if device_type == "cuda":
        return not INTERPRET and torch.cuda.is_available()
    if device_type == "cpu":
        return INTERPRET
    return False
