"""dfa_kernels: fast Direct Feedback Alignment for PyTorch.

The output error is sent to every hidden layer at once through fixed random matrices that are a
hash function of (seed, i, j), computed by fused CPU, CUDA and Triton kernels.
"""

from . import feedback, ops
from .align import alignment
from .convert import DFAModel, FeedbackPoint, HybridGradientWarning, convert
from .feedback import DISTRIBUTIONS, LAYOUTS, FeedbackSpec
from .layerwise import FeedbackConv2d, FeedbackLinear
from .methods import METHODS, MODES
from .nn import DFA
from .ops import available_backends, build_info, clear_matrix_cache, project

# The spec sits below the ops (they take specs), so it cannot import them: FeedbackSpec.matrix()
# gets its builder here, where the package is put together.
feedback.set_matrix_builder(ops.feedback_matrix)

# The one source of the version: pyproject.toml reads it from here (statically) for the package metadata.
__version__ = "0.1.0"
__all__ = [
    "DFA",
    "DFAModel",
    "DISTRIBUTIONS",
    "FeedbackConv2d",
    "FeedbackLinear",
    "FeedbackPoint",
    "FeedbackSpec",
    "HybridGradientWarning",
    "LAYOUTS",
    "METHODS",
    "MODES",
    "alignment",
    "available_backends",
    "build_info",
    "clear_matrix_cache",
    "convert",
    "project",
    "__version__",
]
