// CUDA launchers (ATen side) of the virtual projection, the materialized projection and
// feedback_matrix: argument checks, allocation (outputs, split-K workspaces, e padding), the plan
// (cuda/plan.h) and the launch sequences of cuda/project.cuh, which hold the kernels.
//
// Materialized projection: the narrow kernel reading B for K <= 16; else cuBLAS: for fp16/bf16 e
// in e's dtype on the tensor cores (B stored in that dtype; fp32 accumulation, the scale applied by
// cuBLAS), for fp32 e in fp32 (TF32 as torch's matmul setting says); then the epilogue if needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "aten_glue.h"
#include "dfa_kernels/checks.h"
#include "dfa_kernels/cuda/gemm.cuh"
#include "dfa_kernels/cuda/project.cuh"
#include "dfa_kernels/hash.h"
#include "dfa_kernels/ops.h"

namespace dfa_kernels {
namespace {

NarrowParams narrow_params(const at::Tensor& e, const at::Tensor& out, const float* col_scale, float scale) {
  NarrowParams p{};
  p.e = e.const_data_ptr();
  p.out = out.data_ptr();
  p.col_scale = col_scale;
  p.N = e.size(0);
  p.K = e.size(1);
  p.W = out.size(1);
  p.scale = scale;
  p.e_kind = fp_kind(e.scalar_type());
  p.out_kind = fp_kind(out.scalar_type());
  return p;
}

void check_narrow_plan(const NarrowPlan& plan, int64_t N, int64_t W) {
  TORCH_CHECK(plan.blocks <= INT32_MAX, "project: output too large for one launch (", N, " x ", W, ")");
}

const float* col_scale_ptr(const std::optional<at::Tensor>& col_scale, at::Tensor& holder) {
  if (!col_scale.has_value()) return nullptr;
  holder = col_scale->contiguous();
  return holder.const_data_ptr<float>();
}

at::Tensor project_cuda(const at::Tensor& e, int64_t seed, c10::string_view distribution, double density,
                        int64_t width, double scale, const std::optional<at::Tensor>& col_scale,
                        std::optional<at::ScalarType> out_dtype) {
  const FeedbackSpec spec = parse_feedback_spec(seed, distribution, density);
  const at::ScalarType out_type = check_project_args("project", e, width, col_scale, out_dtype);
  const c10::cuda::CUDAGuard guard(e.device());
  const int64_t N = e.size(0), K = e.size(1), W = width;
  at::Tensor out = at::empty({N, W}, e.options().dtype(out_type));
  if (N == 0 || W == 0) return out;
  if (K == 0) return out.zero_();

  at::Tensor cs_holder;
  const float* cs = col_scale_ptr(col_scale, cs_holder);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ProjectPlan plan = plan_project(N, K, W, e.scalar_type() != at::kFloat, device_caps());
  if (plan.path == ProjectPath::Narrow) {
    check_narrow_plan(plan.narrow, N, W);
    launch_narrow(plan.narrow, narrow_params(e, out, cs, static_cast<float>(scale)),
                  GeneratedB<1>{spec.dist, seed_key(spec.seed), spec.threshold, 0, {}}, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  TORCH_CHECK(plan.tiles <= INT32_MAX, "project: output too large for one launch (", N, " x ", W, ")");
  ProjectParams p{};
  p.e = e.const_data_ptr();
  p.out = out.data_ptr();
  p.col_scale = cs;
  p.N = N;
  p.K = K;
  p.W = W;
  p.scale = static_cast<float>(scale);
  p.skey = seed_key(spec.seed);
  p.threshold = spec.threshold;
  p.dist = spec.dist;
  p.in_kind = fp_kind(e.scalar_type());
  p.out_kind = fp_kind(out_type);
  at::Tensor e_padded;  // tensor cores: rows at a multiple of 8 entries (16 bytes), for vector loads
  if (plan.lde != K) {
    e_padded = at::zeros({N, plan.lde}, e.options());
    e_padded.narrow(1, 0, K).copy_(e);
    p.e = e_padded.const_data_ptr();
  }
  at::Tensor partial;
  if (plan.split.splits > 1) {
    partial = at::empty({plan.split.splits, N, W}, e.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  launch_project_gemm(plan, p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out [N, W] (row-major, fp32 or e's dtype) = alpha * e [N, K] @ B [K, W] for 16-bit e and B of e's
// dtype, by cublasGemmEx with fp32 compute (plan.h's rowmajor_gemm).
void gemm_rowmajor_16bit(const at::Tensor& e, const at::Tensor& B, const at::Tensor& out, float alpha) {
  const int64_t N = e.size(0), K = e.size(1), W = B.size(1);
  TORCH_CHECK(N <= INT_MAX && K <= INT_MAX && W <= INT_MAX && B.stride(0) <= INT_MAX,
              "project_materialized: shape above cuBLAS's 32-bit limit: e ", e.sizes(), ", B ", B.sizes());
  const cudaDataType_t in = cuda_type(e.scalar_type());
  TORCH_CUDABLAS_CHECK(call_gemm(cublasGemmEx, at::cuda::getCurrentCUDABlasHandle(),
                                 rowmajor_gemm(e.const_data_ptr(), K, B.const_data_ptr(), B.stride(0), out.data_ptr(),
                                               N, W, K),
                                 in, cuda_type(out.scalar_type()), alpha));
}

at::Tensor project_materialized_cuda(const at::Tensor& e, const at::Tensor& B, double scale,
                                     const std::optional<at::Tensor>& col_scale,
                                     std::optional<at::ScalarType> out_dtype) {
  check_materialized_B("project_materialized", e, B);
  const at::ScalarType out_type =
      check_project_args("project_materialized", e, B.size(1), col_scale, out_dtype);
  const c10::cuda::CUDAGuard guard(e.device());
  const int64_t N = e.size(0), K = e.size(1), W = B.size(1);
  if (N == 0 || W == 0 || K == 0) return at::zeros({N, W}, e.options().dtype(out_type));

  at::Tensor cs_holder;
  const float* cs = col_scale_ptr(col_scale, cs_holder);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (K <= kNarrowMaxK) {  // one pass writing the output, instead of a GEMM, an epilogue and a cast
    const at::Tensor Bc =
        is_supported_activation_dtype(B.scalar_type()) ? B.contiguous() : B.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({N, W}, e.options().dtype(out_type));
    const NarrowPlan plan = plan_narrow(N, K, W, device_caps());
    check_narrow_plan(plan, N, W);
    launch_narrow(plan, narrow_params(e, out, cs, static_cast<float>(scale)),
                  StoredB<1>{Bc.const_data_ptr(), W, 0, fp_kind(Bc.scalar_type())}, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (e.scalar_type() != at::kFloat) {
    // Tensor cores: cuBLAS in e's dtype with fp32 accumulation, scale as alpha. B in another dtype
    // (the Python wrappers cache it in e's) is converted here, a pass over B per call.
    const at::Tensor Bc = B.scalar_type() == e.scalar_type() && B.stride(1) == 1 && B.stride(0) >= W
                              ? B : B.to(e.scalar_type()).contiguous();
    // Written by cuBLAS directly when no col_scale is left and cuBLAS can write the dtype (fp32 or e's).
    const bool direct = !col_scale.has_value() && (out_type == at::kFloat || out_type == e.scalar_type());
    at::Tensor out = at::empty({N, W}, e.options().dtype(direct ? out_type : at::kFloat));
    gemm_rowmajor_16bit(e, Bc, out, direct ? static_cast<float>(scale) : 1.0f);
    if (direct) return out;
    at::Tensor final_out = out_type == at::kFloat ? out : at::empty({N, W}, e.options().dtype(out_type));
    launch_epilogue(out.const_data_ptr<float>(), 1, N * W, W, static_cast<float>(scale), cs, final_out.data_ptr(),
                    fp_kind(out_type), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return final_out;
  }
  const at::Tensor acc = at::mm(e, B.to(at::kFloat));  // cuBLAS, fp32 (TF32 if torch allows it)
  if (out_type == at::kFloat && scale == 1.0 && !col_scale.has_value()) return acc;
  at::Tensor out = out_type == at::kFloat ? acc : at::empty({N, W}, e.options().dtype(out_type));
  launch_epilogue(acc.const_data_ptr<float>(), 1, N * W, W, static_cast<float>(scale), cs, out.data_ptr(),
                  fp_kind(out_type), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor feedback_matrix_cuda(const FeedbackSpec& spec, int64_t rows, int64_t cols, at::ScalarType dtype,
                                at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(dtype).device(device));
  if (out.numel() == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "feedback_matrix_cuda", [&] {
    launch_feedback_matrix(out.mutable_data_ptr<scalar_t>(), rows, cols, seed_key(spec.seed), spec.dist,
                           spec.threshold, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

int cuda_runtime_version_built() { return CUDART_VERSION; }

}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CUDA, m) {
  m.impl("project", &dfa_kernels::project_cuda);
  m.impl("project_materialized", &dfa_kernels::project_materialized_cuda);
}
