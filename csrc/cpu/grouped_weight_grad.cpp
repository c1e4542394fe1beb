// CPU grouped weight gradient: out[l] = grads[l]^T @ inputs[l] for every layer. The layers are
// independent; each product is a threaded BLAS call, so they run one after another here (the
// GPU backends put them in one launch).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "dfa_kernels/checks.h"

namespace dfa_kernels {
namespace {

std::vector<at::Tensor> grouped_weight_grad_cpu(at::TensorList grads, at::TensorList inputs,
                                                std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_type = check_grouped_weight_grad_args(grads, inputs, out_dtype);
  std::vector<at::Tensor> outs;
  outs.reserve(grads.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    // fp32 accumulation whatever the input dtype (CPU BLAS has no 16-bit GEMM with fp32 accumulate).
    outs.push_back(at::mm(grads[l].to(at::kFloat).t(), inputs[l].to(at::kFloat)).to(out_type));
  }
  return outs;
}

}  // namespace
}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CPU, m) {
  m.impl("grouped_weight_grad", &dfa_kernels::grouped_weight_grad_cpu);
}
