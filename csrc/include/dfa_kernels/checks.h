// Argument validation and parsing shared by the CPU and CUDA implementations, so every backend
// rejects the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "dfa_kernels/hash.h"

namespace dfa_kernels {

// The parsed (seed, distribution, density) triple that defines B.
struct FeedbackSpec {
  Distribution dist;
  uint32_t seed;
  uint32_t threshold;  // sparse only: entries with (h >> 8) < threshold are nonzero
};

// Indices i, j are hashed as uint32, so B has at most 2^32 rows and columns.
constexpr int64_t kMaxIndexCount = int64_t{1} << 32;

inline Distribution parse_distribution(c10::string_view name) {
  if (name == "uniform") return Distribution::Uniform;
  if (name == "gaussian") return Distribution::Gaussian;
  if (name == "rademacher") return Distribution::Rademacher;
  if (name == "sparse") return Distribution::Sparse;
  TORCH_CHECK(false, "dfa_kernels: distribution must be one of \"uniform\", \"gaussian\", "
              "\"rademacher\", \"sparse\"; got \"", std::string(name), "\"");
}

inline FeedbackSpec parse_feedback_spec(int64_t seed, c10::string_view distribution, double density) {
  TORCH_CHECK(seed >= 0 && seed < kMaxIndexCount, "dfa_kernels: seed must be in [0, 2^32), got ",
              seed);
  const Distribution dist = parse_distribution(distribution);
  uint32_t threshold = 0;
  if (dist == Distribution::Sparse) {
    TORCH_CHECK(density >= 0.0 && density <= 1.0,  // also rejects NaN
                "dfa_kernels: density must be in [0, 1] for the sparse distribution, got ", density);
    threshold = sparse_threshold(density);
  }
  return {dist, static_cast<uint32_t>(seed), threshold};
}

inline bool is_supported_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Checks e, width and col_scale (shared by both projections) and returns the output dtype.
inline at::ScalarType check_project_args(const char* op, const at::Tensor& e, int64_t width,
                                         const std::optional<at::Tensor>& col_scale,
                                         std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(e.dim() == 2, op, ": e must be a 2-D tensor [N, out_features], got ", e.dim(),
              "-D with shape ", e.sizes());
  TORCH_CHECK(is_supported_activation_dtype(e.scalar_type()), op,
              ": e must be float32, float16 or bfloat16, got ", e.scalar_type());
  TORCH_CHECK(e.is_contiguous(), op, ": e must be contiguous (call .contiguous())");
  TORCH_CHECK(e.size(1) <= kMaxIndexCount, op, ": out_features (e.size(1)) must be at most 2^32, got ",
              e.size(1));
  TORCH_CHECK(width >= 0 && width <= kMaxIndexCount, op, ": width must be in [0, 2^32], got ", width);
  if (col_scale.has_value()) {
    const at::Tensor& cs = *col_scale;
    TORCH_CHECK(cs.dim() == 1 && cs.size(0) == width, op, ": col_scale must have shape [width] = [",
                width, "], got ", cs.sizes());
    TORCH_CHECK(cs.scalar_type() == at::kFloat, op, ": col_scale must be float32, got ",
                cs.scalar_type());
    TORCH_CHECK(cs.device() == e.device(), op, ": col_scale must be on the same device as e (",
                e.device(), "), got ", cs.device());
  }
  const at::ScalarType out = out_dtype.value_or(e.scalar_type());
  TORCH_CHECK(is_supported_activation_dtype(out), op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out);
  return out;
}

inline void check_materialized_B(const char* op, const at::Tensor& e, const at::Tensor& B) {
  TORCH_CHECK(B.dim() == 2, op, ": B must be a 2-D tensor [out_features, width], got ", B.dim(),
              "-D with shape ", B.sizes());
  TORCH_CHECK(at::isFloatingType(B.scalar_type()), op, ": B must be a floating-point tensor, got ",
              B.scalar_type());
  TORCH_CHECK(B.device() == e.device(), op, ": B must be on the same device as e (", e.device(),
              "), got ", B.device());
  TORCH_CHECK(e.dim() != 2 || B.size(0) == e.size(1), op,
              ": B.size(0) must equal e.size(1) (out_features = ", e.dim() == 2 ? e.size(1) : -1,
              "), got B of shape ", B.sizes());
}

inline void check_feedback_matrix_args(int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(rows >= 0 && rows <= kMaxIndexCount, "feedback_matrix: rows must be in [0, 2^32], got ",
              rows);
  TORCH_CHECK(cols >= 0 && cols <= kMaxIndexCount, "feedback_matrix: cols must be in [0, 2^32], got ",
              cols);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "feedback_matrix: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

}  // namespace dfa_kernels
