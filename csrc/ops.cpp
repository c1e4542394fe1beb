// The op schemas of the dfa_kernels library, defined once. Each backend file registers its
// implementations for its dispatch key (cpu/project.cpp: CPU, cuda/project.cu: CUDA); fake (meta)
// kernels and autograd are registered from Python (dfa_kernels/ops.py).
#include <torch/library.h>

#include "dfa_kernels/checks.h"
#include "dfa_kernels/ops.h"

namespace dfa_kernels {
namespace {

// feedback_matrix has no tensor argument to dispatch on, so one CompositeExplicitAutograd kernel
// picks the backend from `device`.
at::Tensor feedback_matrix(int64_t seed, c10::string_view distribution, double density, int64_t rows,
                           int64_t cols, at::ScalarType dtype, at::Device device) {
  const FeedbackSpec spec = parse_feedback_spec(seed, distribution, density);
  check_feedback_matrix_args(rows, cols, dtype);
  switch (device.type()) {
    case at::DeviceType::CPU:
      return feedback_matrix_cpu(spec, rows, cols, dtype);
    case at::DeviceType::CUDA:
#ifdef DFA_CUDA_COMPILED
      return feedback_matrix_cuda(spec, rows, cols, dtype, device);
#else
      TORCH_CHECK(false, "feedback_matrix: device ", device,
                  " requested, but dfa_kernels was built without its CUDA kernels "
                  "(CPU-only build); rebuild with nvcc available, or use device=\"cpu\"");
#endif
    default:
      TORCH_CHECK(false, "feedback_matrix: device must be cpu or cuda, got ", device);
  }
}

}  // namespace
}  // namespace dfa_kernels

TORCH_LIBRARY(dfa_kernels, m) {
  // F[N, width] = scale * (e @ B) * col_scale, B[i, j] generated from the hash (never stored).
  m.def("project(Tensor e, int seed, str distribution, float density, int width, float scale, "
        "Tensor? col_scale, ScalarType? out_dtype) -> Tensor");
  // The same product with a given B [out_features, width].
  m.def("project_materialized(Tensor e, Tensor B, float scale, Tensor? col_scale, "
        "ScalarType? out_dtype) -> Tensor");
  // One launch for every feedback point l: out[l] [N, widths[l]] =
  //   (scales[l] * (e @ B[:, offsets[l] : offsets[l] + widths[l]])) * f_l'(act_inputs[l]),
  // the activation derivative f_l' (activations[l]: none, relu, gelu, tanh, sigmoid, silu) applied
  // in the epilogue to the point's pre-activation [N, widths[l]]. B is generated (B = None) or read.
  m.def("project_points(Tensor e, Tensor? B, int seed, str distribution, float density, int[] offsets, "
        "int[] widths, float[] scales, Tensor?[] act_inputs, str[] activations, ScalarType? out_dtype) "
        "-> Tensor[]");
  // out[l] = grads[l]^T @ inputs[l] for every l in one launch: the weight gradients of all DFA
  // layers, which do not depend on each other. grads[l] [N_l, out_l], inputs[l] [N_l, in_l].
  m.def("grouped_weight_grad(Tensor[] grads, Tensor[] inputs, ScalarType? out_dtype) -> Tensor[]");
  // B [rows, cols] written out.
  m.def("feedback_matrix(int seed, str distribution, float density, int rows, int cols, "
        "ScalarType dtype, Device device) -> Tensor");
}

TORCH_LIBRARY_IMPL(dfa_kernels, CompositeExplicitAutograd, m) {
  m.impl("feedback_matrix", &dfa_kernels::feedback_matrix);
}
