// CUDA grouped weight gradient: out[l] = grads[l]^T @ inputs[l] for every layer, fp32 accumulate.
//
// cuBLAS is column-major: the row-major output [O, I] is the column-major C [I, O] = op(A) @ op(B)
// with A = inputs[l] (row-major [N, I] = column-major [I, N], not transposed) and B = grads[l]
// (row-major [N, O] = column-major [O, N], transposed): m = I, n = O, k = N.
//
// Layers whose dtype is the output dtype go to one cublasGemmGroupedBatchedEx call (cuBLAS >= 12.5),
// layers of one shape forming one group (cuda/gemm.cuh writes the call, its pointer arrays and
// their fill kernel; the CUDA-on-CPU harness runs the same code against a host GEMM). The call is
// resolved at run time from the cuBLAS library the process loaded (the headers at build time can be
// newer than the library at run time): without it, each layer gets its own GEMM, with a warning
// (once) and grouped_gemm_status() saying why. While the stream is being captured into a CUDA graph,
// each layer gets its own cublasGemmEx too: cuBLAS documents graph capture for its GEMMs, not for the
// grouped call, so a captured step never depends on it. That API only supports A/B/C of a single type (fp32,
// fp16 or bf16 with fp32 compute), so a layer whose output dtype differs from its inputs (fp16/bf16
// activations with fp32 weights under autocast) gets its own cublasGemmEx, which writes fp32
// directly from 16-bit inputs (rounding the fp32 sums to 16 bits first would lose precision and
// can overflow fp16); fp32 results for a 16-bit output of another type are cast after.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cublas_v2.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "aten_glue.h"
#include "dfa_kernels/checks.h"
#include "dfa_kernels/cuda/gemm.cuh"
#include "dfa_kernels/ops.h"

#if defined(CUBLAS_VERSION) && CUBLAS_VERSION >= 120500
#define DFA_HAVE_GROUPED_GEMM 1
#else
#define DFA_HAVE_GROUPED_GEMM 0
#endif

namespace dfa_kernels {
namespace {

// t as a cuBLAS operand: copied only when cuBLAS could not take it as is (plan.h gemm_operand_ok).
at::Tensor gemm_operand(const at::Tensor& t) {
  const bool ok = gemm_operand_ok(t.size(1), t.stride(0), t.stride(1), reinterpret_cast<uintptr_t>(t.const_data_ptr()));
  return ok ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

void check_fits_int(int64_t v, const char* what, size_t l) {
  TORCH_CHECK(v <= INT_MAX, "grouped_weight_grad: ", what, " of layer ", l, " is ", v,
              ", above cuBLAS's 32-bit limit");
}

#if DFA_HAVE_GROUPED_GEMM
static_assert(std::is_same_v<decltype(&cublasGemmGroupedBatchedEx), GroupedGemmFn>,
              "gemm.cuh's GroupedGemmFn must be cuBLAS's signature");

struct GroupedGemm {
  GroupedGemmFn fn = nullptr;
  std::string status;  // "available (cuBLAS x.y.z)" or why not
};

// cublasGemmGroupedBatchedEx from the loaded cuBLAS (found through the library that holds
// cublasGetProperty), or nullptr with the reason. Looked up once.
const GroupedGemm& grouped_gemm() {
  static const GroupedGemm found = [] {
    GroupedGemm g;
    int major = 0, minor = 0, patch = 0;
    cublasGetProperty(MAJOR_VERSION, &major);
    cublasGetProperty(MINOR_VERSION, &minor);
    cublasGetProperty(PATCH_LEVEL, &patch);
    const std::string version = std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
    Dl_info info{};
    void* lib = nullptr;
    if (dladdr(reinterpret_cast<void*>(&cublasGetProperty), &info) != 0 && info.dli_fname != nullptr) {
      lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    }
    void* sym = lib != nullptr ? dlsym(lib, "cublasGemmGroupedBatchedEx") : nullptr;
    if (sym != nullptr && (major > 12 || (major == 12 && minor >= 5))) {
      g.fn = reinterpret_cast<GroupedGemmFn>(sym);
      g.status = "available (cuBLAS " + version + ")";
    } else {
      g.status = "unavailable: cuBLAS " + version + " at run time has no cublasGemmGroupedBatchedEx (needs 12.5); "
                 "one GEMM per layer";
    }
    return g;
  }();
  return found;
}

#endif

std::vector<at::Tensor> grouped_weight_grad_cuda(at::TensorList grads, at::TensorList inputs,
                                                 std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out_type = check_grouped_weight_grad_args(grads, inputs, out_dtype);
  std::vector<at::Tensor> outs;
  if (grads.empty()) return outs;
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream

  std::vector<at::Tensor> operands;  // keeps copied operands alive until the calls are queued
  std::vector<ColMajorGemm> grouped;
#if DFA_HAVE_GROUPED_GEMM
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  GroupedGemmFn grouped_fn = grouped_gemm().fn;
  if (grouped_fn == nullptr && grads.size() > 1) TORCH_WARN_ONCE("dfa_kernels grouped_weight_grad: ", grouped_gemm().status);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) grouped_fn = nullptr;  // per-layer GEMMs while capturing
#else
  constexpr void* grouped_fn = nullptr;
#endif
  for (size_t l = 0; l < grads.size(); ++l) {
    const int64_t N = grads[l].size(0), O = grads[l].size(1), I = inputs[l].size(1);
    const at::ScalarType in = grads[l].scalar_type();
    outs.push_back(N == 0 ? at::zeros({O, I}, grads[l].options().dtype(out_type))
                          : at::empty({O, I}, grads[l].options().dtype(out_type)));
    if (N == 0 || O == 0 || I == 0) continue;
    const at::Tensor x = gemm_operand(inputs[l]), g = gemm_operand(grads[l]);
    operands.push_back(x);
    operands.push_back(g);
    check_fits_int(I, "in_features", l);
    check_fits_int(O, "out_features", l);
    check_fits_int(N, "the row count", l);
    check_fits_int(x.stride(0), "inputs' row stride", l);
    check_fits_int(g.stride(0), "grads' row stride", l);
    ColMajorGemm gemm = weight_grad_gemm(g.const_data_ptr(), g.stride(0), x.const_data_ptr(), x.stride(0),
                                         outs[l].data_ptr(), N, O, I);
    if (in == out_type && grouped_fn != nullptr) {
      grouped.push_back(gemm);
      continue;
    }
    // cuBLAS writes fp32 from any input type, and the input type itself; other outputs via fp32.
    const at::ScalarType c_type = (in == out_type || out_type == at::kFloat) ? out_type : at::kFloat;
    at::Tensor c = c_type == out_type ? outs[l] : at::empty({O, I}, grads[l].options().dtype(at::kFloat));
    gemm.c = c.data_ptr();
    TORCH_CUDABLAS_CHECK(call_gemm(cublasGemmEx, handle, gemm, cuda_type(in), cuda_type(c_type), 1.0f));
    if (!c.is_same(outs[l])) outs[l].copy_(c);
  }
#if DFA_HAVE_GROUPED_GEMM
  if (grouped.size() == 1) {
    TORCH_CUDABLAS_CHECK(call_gemm(cublasGemmEx, handle, grouped[0], cuda_type(out_type), cuda_type(out_type), 1.0f));
  } else if (!grouped.empty()) {
    const GroupedGemmArgs args = plan_grouped_gemm(grouped);
    const at::Tensor dev_ptrs = at::empty({static_cast<int64_t>(args.ptrs.size())}, at::TensorOptions().dtype(at::kLong).device(device));
    TORCH_CUDABLAS_CHECK(call_grouped_gemm(grouped_fn, handle, args, dev_ptrs.data_ptr<int64_t>(), cuda_type(out_type), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
#endif
  return outs;
}

}  // namespace

std::string grouped_gemm_status() {
#if DFA_HAVE_GROUPED_GEMM
  return grouped_gemm().status;
#else
  return "unavailable: built against cuBLAS headers older than 12.5; one GEMM per layer";
#endif
}
}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CUDA, m) {
  m.impl("grouped_weight_grad", &dfa_kernels::grouped_weight_grad_cuda);
}
