// Backend entry points that are called directly rather than through the dispatcher:
// feedback_matrix has no tensor argument, so ops.cpp chooses the backend from its `device`.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "dfa_kernels/checks.h"

namespace dfa_kernels {

at::Tensor feedback_matrix_cpu(const FeedbackSpec& spec, int64_t rows, int64_t cols,
                               at::ScalarType dtype);

#ifdef DFA_CUDA_COMPILED
at::Tensor feedback_matrix_cuda(const FeedbackSpec& spec, int64_t rows, int64_t cols,
                                at::ScalarType dtype, at::Device device);

// CUDART_VERSION of the toolkit the kernels were compiled with (e.g. 13000).
int cuda_runtime_version_built();

// Whether grouped_weight_grad runs one grouped cuBLAS GEMM ("available (cuBLAS x.y.z)") or one GEMM
// per layer, and why: the cuBLAS library loaded at run time decides.
std::string grouped_gemm_status();
#endif

}  // namespace dfa_kernels
