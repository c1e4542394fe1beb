"""dfa_kernels: fast Direct Feedback Alignment for PyTorch.

The output error is sent to every hidden layer at once through fixed random matrices that are a
hash function of (seed, i, j), computed by fused CPU, CUDA and Triton kernels.
"""
from .feedback import DISTRIBUTIONS, LAYOUTS, FeedbackSpec
from .convert import DFAModel, FeedbackPoint, HybridGradientWarning, convert
from .nn import DFA
from .ops import available_backends, build_info, clear_matrix_cache, project

__version__ = "0.1.0"
__all__ = ["DFA", "DFAModel", "DISTRIBUTIONS", "FeedbackPoint", "FeedbackSpec", "HybridGradientWarning",
           "LAYOUTS", "alignment", "available_backends", "build_info", "clear_matrix_cache", "convert", "project",
           "__version__"]


def __getattr__(name):
    # dk.alignment lives with the studies, imported on first use (the core never imports them)
    if name == "alignment":
        from .studies.alignment import alignment
        return alignment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
