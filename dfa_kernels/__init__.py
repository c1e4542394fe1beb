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
           "LAYOUTS", "available_backends", "build_info", "clear_matrix_cache", "convert", "project", "__version__"]
