// Activation derivatives for the fused epilogue of project_points: a point that records its
// pre-activation a gets grad(a) = (e @ B_l) * f'(a) from the projection itself, in one pass.
// One definition for the CPU and CUDA kernels; dfa_kernels/reference.py (activation_grad) and the
// Triton kernels implement the same formulas.
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/util/string_view.h>
#include <c10/util/Exception.h>

#if defined(__CUDACC__)
#define DFA_ACT_HD __host__ __device__ __forceinline__
#else
#define DFA_ACT_HD inline
#endif

namespace dfa_kernels {

enum class Activation : int { None = 0, Relu = 1, Gelu = 2, Tanh = 3, Sigmoid = 4, Silu = 5 };

inline Activation parse_activation(c10::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "tanh") return Activation::Tanh;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK(false, "dfa_kernels: activation must be one of \"none\", \"relu\", \"gelu\", \"tanh\", "
              "\"sigmoid\", \"silu\"; got \"", std::string(name), "\"");
}

// f'(a) in fp32. relu'(0) = 0 (as torch's threshold_backward); gelu is the exact (erf) GELU:
// Phi(a) + a phi(a).
DFA_ACT_HD float activation_grad(Activation act, float a) {
  switch (act) {
    case Activation::Relu:
      return a > 0.0f ? 1.0f : 0.0f;
    case Activation::Gelu:
      return 0.5f * (1.0f + erff(a * 0.70710678118654752f)) + a * 0.39894228040143268f * expf(-0.5f * a * a);
    case Activation::Tanh: {
      const float t = tanhf(a);
      return 1.0f - t * t;
    }
    case Activation::Sigmoid: {
      const float s = 1.0f / (1.0f + expf(-a));
      return s * (1.0f - s);
    }
    case Activation::Silu: {
      const float s = 1.0f / (1.0f + expf(-a));
      return s * (1.0f + a * (1.0f - s));
    }
    default:
      return 1.0f;
  }
}

}  // namespace dfa_kernels
