// Argument validation and parsing shared by the CPU and CUDA implementations, so every backend
// rejects the same inputs with the same messages.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dfa_kernels/activation.h"
#include "dfa_kernels/hash.h"
#include "dfa_kernels/spans.h"

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

// One feedback point of project_points, validated: columns [offset, offset + width) of B, its
// scale, and its activation with the pre-activation [N, width] (act_input undefined for none).
struct PointArgs {
  int64_t offset, width;
  float scale;
  Activation act;
  at::Tensor act_input;
};

// The points' column spans (spans.h).
inline std::vector<std::pair<int64_t, int64_t>> column_spans(const std::vector<PointArgs>& points) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  ranges.reserve(points.size());
  for (const PointArgs& p : points) ranges.emplace_back(p.offset, p.width);
  return column_spans(ranges);
}

// Checks every argument of project_points (all backends) and returns the points and the output
// dtype. B, when given, must cover every point's columns.
inline std::vector<PointArgs> check_project_points_args(
    const at::Tensor& e, const std::optional<at::Tensor>& B, at::IntArrayRef offsets,
    at::IntArrayRef widths, at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& act_inputs, const std::vector<std::string>& activations,
    std::optional<at::ScalarType> out_dtype, at::ScalarType* out_type) {
  const char* op = "project_points";
  *out_type = check_project_args(op, e, 0, std::nullopt, out_dtype);
  const size_t n = offsets.size();
  TORCH_CHECK(widths.size() == n && scales.size() == n && act_inputs.size() == n &&
                  activations.size() == n,
              op, ": offsets, widths, scales, act_inputs and activations must have one entry per point; "
              "got ", n, ", ", widths.size(), ", ", scales.size(), ", ", act_inputs.size(), " and ",
              activations.size());
  if (B.has_value()) check_materialized_B(op, e, *B);
  std::vector<PointArgs> points;
  points.reserve(n);
  for (size_t l = 0; l < n; ++l) {
    PointArgs p{offsets[l], widths[l], static_cast<float>(scales[l]), parse_activation(activations[l]),
                at::Tensor()};
    TORCH_CHECK(p.offset >= 0 && p.width >= 0 && p.offset + p.width <= kMaxIndexCount, op,
                ": point ", l, " needs offsets[", l, "] >= 0, widths[", l, "] >= 0 and columns below 2^32; "
                "got offset ", p.offset, ", width ", p.width);
    if (B.has_value()) {
      TORCH_CHECK(p.offset + p.width <= B->size(1), op, ": point ", l, " reads columns [", p.offset, ", ",
                  p.offset + p.width, ") but B has ", B->size(1), " columns");
    }
    const std::optional<at::Tensor> a = act_inputs.get(l);
    if (p.act == Activation::None) {
      TORCH_CHECK(!a.has_value(), op, ": act_inputs[", l, "] must be None when activations[", l,
                  "] is \"none\"");
    } else {
      TORCH_CHECK(a.has_value(), op, ": act_inputs[", l, "] (the pre-activation [N, ", p.width,
                  "]) is required for activation \"", std::string(activations[l]), "\"");
      TORCH_CHECK(a->dim() == 2 && a->size(0) == e.size(0) && a->size(1) == p.width, op, ": act_inputs[",
                  l, "] must have shape [N, widths[", l, "]] = [", e.size(0), ", ", p.width, "], got ",
                  a->sizes());
      TORCH_CHECK(is_supported_activation_dtype(a->scalar_type()), op, ": act_inputs[", l,
                  "] must be float32, float16 or bfloat16, got ", a->scalar_type());
      TORCH_CHECK(a->device() == e.device(), op, ": act_inputs[", l, "] must be on e's device (",
                  e.device(), "), got ", a->device());
      TORCH_CHECK(a->is_contiguous(), op, ": act_inputs[", l, "] must be contiguous");
      p.act_input = *a;
    }
    points.push_back(std::move(p));
  }
  return points;
}

// Checks grouped_weight_grad's lists and returns the output dtype.
inline at::ScalarType check_grouped_weight_grad_args(at::TensorList grads, at::TensorList inputs,
                                                     std::optional<at::ScalarType> out_dtype) {
  const char* op = "grouped_weight_grad";
  TORCH_CHECK(grads.size() == inputs.size(), op, ": grads and inputs must have one tensor per layer; got ",
              grads.size(), " and ", inputs.size());
  for (size_t l = 0; l < grads.size(); ++l) {
    const at::Tensor& g = grads[l];
    const at::Tensor& x = inputs[l];
    TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0), op, ": grads[", l,
                "] must be [N, out] and inputs[", l, "] [N, in] with the same N; got ", g.sizes(), " and ",
                x.sizes());
    TORCH_CHECK(is_supported_activation_dtype(g.scalar_type()) && g.scalar_type() == x.scalar_type(), op,
                ": grads[", l, "] and inputs[", l, "] must share one dtype of float32, float16, bfloat16; got ",
                g.scalar_type(), " and ", x.scalar_type());
    TORCH_CHECK(g.device() == grads[0].device() && x.device() == grads[0].device(), op,
                ": every tensor must be on one device (", grads[0].device(), "); grads[", l, "] is on ",
                g.device(), " and inputs[", l, "] on ", x.device());
  }
  const at::ScalarType out =
      out_dtype.value_or(grads.empty() ? at::kFloat : grads[0].scalar_type());
  TORCH_CHECK(is_supported_activation_dtype(out), op,
              ": out_dtype must be float32, float16 or bfloat16, got ", out);
  return out;
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
