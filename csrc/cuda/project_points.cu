// CUDA launcher (ATen side) of project_points: argument checks, outputs and split-K workspaces, the
// plan (cuda/plan.h: column spans, point chunks, split-K) and the launch sequence of
// cuda/project_points.cuh, which holds the kernels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "aten_glue.h"
#include "dfa_kernels/checks.h"
#include "dfa_kernels/cuda/project_points.cuh"
#include "dfa_kernels/hash.h"

namespace dfa_kernels {
namespace {

std::vector<at::Tensor> project_points_cuda(const at::Tensor& e, const std::optional<at::Tensor>& B, int64_t seed,
                                            c10::string_view distribution, double density,
                                            at::IntArrayRef offsets, at::IntArrayRef widths,
                                            at::ArrayRef<double> scales,
                                            const c10::List<std::optional<at::Tensor>>& act_inputs,
                                            const std::vector<std::string>& activations,
                                            std::optional<at::ScalarType> out_dtype) {
  const FeedbackSpec spec = parse_feedback_spec(seed, distribution, density);
  at::ScalarType out_type;
  const std::vector<PointArgs> points =
      check_project_points_args(e, B, offsets, widths, scales, act_inputs, activations, out_dtype, &out_type);
  const c10::cuda::CUDAGuard guard(e.device());
  const int64_t N = e.size(0), K = e.size(1);
  std::vector<at::Tensor> outs;
  outs.reserve(points.size());
  for (const PointArgs& pa : points) {
    outs.push_back(K == 0 ? at::zeros({N, pa.width}, e.options().dtype(out_type))
                          : at::empty({N, pa.width}, e.options().dtype(out_type)));
  }
  if (N == 0 || K == 0) return outs;

  PointsParams p{};
  p.e = e.const_data_ptr();
  p.N = N;
  p.K = K;
  p.skey = seed_key(spec.seed);
  p.threshold = spec.threshold;
  p.dist = spec.dist;
  p.e_kind = fp_kind(e.scalar_type());
  p.out_kind = fp_kind(out_type);
  at::Tensor B_read;  // B in a dtype the kernel reads, row-major
  if (B.has_value()) {
    B_read = is_supported_activation_dtype(B->scalar_type()) ? B->contiguous() : B->to(at::kFloat).contiguous();
    p.B = B_read.const_data_ptr();
    p.ldb = B_read.size(1);
    p.b_kind = fp_kind(B_read.scalar_type());
  }

  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::vector<PointDesc> descs;
  for (size_t l = 0; l < points.size(); ++l) {
    const PointArgs& pa = points[l];
    ranges.emplace_back(pa.offset, pa.width);
    PointDesc d{};
    d.out = outs[l].data_ptr();
    d.act = pa.act_input.defined() ? pa.act_input.const_data_ptr() : nullptr;
    d.act_kind = pa.act_input.defined() ? fp_kind(pa.act_input.scalar_type()) : FpKind::F32;
    d.act_fn = pa.act;
    d.offset = pa.offset;
    d.width = pa.width;
    d.scale = pa.scale;
    descs.push_back(d);
  }
  const PointsPlan plan = plan_points(N, K, ranges, device_caps());
  std::vector<at::Tensor> partials;
  std::vector<float*> partial_ptrs;
  for (const PointsSpanPlan& span : plan.spans) {
    TORCH_CHECK(span.tiles <= INT32_MAX, "project_points: output too large for one launch (", span.tiles, " tiles)");
    partials.push_back(span.split.splits > 1
                           ? at::empty({span.split.splits, N, span.stop - span.start}, e.options().dtype(at::kFloat))
                           : at::Tensor());
    partial_ptrs.push_back(partials.back().defined() ? partials.back().data_ptr<float>() : nullptr);
  }
  launch_points(plan, p, descs, partial_ptrs, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outs;
}

}  // namespace
}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CUDA, m) {
  m.impl("project_points", &dfa_kernels::project_points_cuda);
}
