// CUDA grouped weight gradient: out[l] = grads[l]^T @ inputs[l] for every layer, fp32 accumulate.
//
// cuBLAS is column-major: the row-major output [O, I] is the column-major C [I, O] = op(A) @ op(B)
// with A = inputs[l] (row-major [N, I] = column-major [I, N], not transposed) and B = grads[l]
// (row-major [N, O] = column-major [O, N], transposed): m = I, n = O, k = N.
//
// Layers whose dtype is the output dtype go to one cublasGemmGroupedBatchedEx call (cuBLAS >= 12.5),
// layers of one shape forming one group. The call is resolved at run time from the cuBLAS library
// the process loaded (the headers at build time can be newer than the library at run time): without
// it, each layer gets its own GEMM, with a warning (once) and grouped_gemm_status() saying why. Its
// device pointer arrays are written by a small kernel whose parameters carry them: no host copy. That API only supports A/B/C of a single type (fp32,
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
#include <map>
#include <tuple>
#include <vector>

#include "dfa_kernels/checks.h"
#include "dfa_kernels/ops.h"

#if defined(CUBLAS_VERSION) && CUBLAS_VERSION >= 120500
#define DFA_HAVE_GROUPED_GEMM 1
#else
#define DFA_HAVE_GROUPED_GEMM 0
#endif

namespace dfa_kernels {
namespace {

cudaDataType_t cuda_type(at::ScalarType t) {
  return t == at::kFloat ? CUDA_R_32F : (t == at::kHalf ? CUDA_R_16F : CUDA_R_16BF);
}

// t as a cuBLAS operand: unit column stride, leading dimension >= max(1, cols), and a 16-byte
// aligned start (cuBLAS requires it for 16-bit types; a column slice can start mid-row). Copies
// only when t breaks one of these.
at::Tensor gemm_operand(const at::Tensor& t) {
  const bool ok = (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= std::max<int64_t>(1, t.size(1)) &&
                  reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return ok ? t : at::empty(t.sizes(), t.options()).copy_(t);
}

// One layer's product in cuBLAS terms.
struct Problem {
  const void* A;  // inputs[l]
  const void* B;  // grads[l]
  void* C;        // out[l] (or an fp32 buffer)
  int m, n, k, lda, ldb;
};

int to_int(int64_t v, const char* what, size_t l) {
  TORCH_CHECK(v <= INT_MAX, "grouped_weight_grad: ", what, " of layer ", l, " is ", v,
              ", above cuBLAS's 32-bit limit");
  return static_cast<int>(v);
}

void gemm_one(cublasHandle_t handle, const Problem& p, at::ScalarType in, at::ScalarType c_type) {
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, p.m, p.n, p.k, &alpha, p.A, cuda_type(in),
                                    p.lda, p.B, cuda_type(in), p.ldb, &beta, p.C, cuda_type(c_type), p.m,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

#if DFA_HAVE_GROUPED_GEMM
using GroupedGemmFn = decltype(&cublasGemmGroupedBatchedEx);

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

// Up to kFillMax 8-byte values written to device memory by one launch that carries them in its
// parameters (3840 B of the 4 KiB parameter space): no host-to-device copy, and a CUDA graph
// replays it with the same values.
constexpr int kFillMax = 480;
struct FillParams {
  int64_t values[kFillMax];
  int count;
};

__global__ void fill_kernel(int64_t* dst, const __grid_constant__ FillParams p) {
  for (int i = threadIdx.x; i < p.count; i += blockDim.x) dst[i] = p.values[i];
}

// Every problem in one call; problems of one shape share a group. All A/B/C are of type `type`.
void gemm_grouped(cublasHandle_t handle, GroupedGemmFn grouped, const std::vector<Problem>& problems,
                  at::ScalarType type, at::Device device) {
  std::map<std::tuple<int, int, int, int, int>, std::vector<const Problem*>> groups;
  for (const Problem& p : problems) groups[{p.m, p.n, p.k, p.lda, p.ldb}].push_back(&p);
  const size_t count = problems.size(), group_count = groups.size();
  std::vector<cublasOperation_t> trans_a(group_count, CUBLAS_OP_N), trans_b(group_count, CUBLAS_OP_T);
  std::vector<int> m, n, k, lda, ldb, sizes;
  std::vector<float> alpha(group_count, 1.0f), beta(group_count, 0.0f);
  std::vector<int64_t> ptrs(3 * count);  // A, then B, then C pointers, group by group
  size_t i = 0;
  for (const auto& [shape, members] : groups) {
    m.push_back(std::get<0>(shape));
    n.push_back(std::get<1>(shape));
    k.push_back(std::get<2>(shape));
    lda.push_back(std::get<3>(shape));
    ldb.push_back(std::get<4>(shape));
    sizes.push_back(static_cast<int>(members.size()));
    for (const Problem* p : members) {
      ptrs[i] = reinterpret_cast<int64_t>(p->A);
      ptrs[count + i] = reinterpret_cast<int64_t>(p->B);
      ptrs[2 * count + i] = reinterpret_cast<int64_t>(p->C);
      ++i;
    }
  }
  const at::Tensor dev = at::empty({static_cast<int64_t>(ptrs.size())}, at::TensorOptions().dtype(at::kLong).device(device));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t first = 0; first < ptrs.size(); first += kFillMax) {
    FillParams fp{};
    fp.count = static_cast<int>(std::min<size_t>(kFillMax, ptrs.size() - first));
    std::copy(ptrs.begin() + first, ptrs.begin() + first + fp.count, fp.values);
    fill_kernel<<<1, 256, 0, stream>>>(dev.data_ptr<int64_t>() + first, fp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto* arrays = reinterpret_cast<void* const*>(dev.const_data_ptr<int64_t>());
  const cudaDataType_t t = cuda_type(type);
  TORCH_CUDABLAS_CHECK(grouped(handle, trans_a.data(), trans_b.data(), m.data(), n.data(), k.data(), alpha.data(),
                               arrays, t, lda.data(), arrays + count, t, ldb.data(), beta.data(), arrays + 2 * count,
                               t, m.data(), static_cast<int>(group_count), sizes.data(), CUBLAS_COMPUTE_32F));
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
  std::vector<Problem> grouped;
#if DFA_HAVE_GROUPED_GEMM
  const GroupedGemmFn grouped_fn = grouped_gemm().fn;
  if (grouped_fn == nullptr && grads.size() > 1) TORCH_WARN_ONCE("dfa_kernels grouped_weight_grad: ", grouped_gemm().status);
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
    Problem p{x.const_data_ptr(), g.const_data_ptr(), outs[l].data_ptr(), to_int(I, "in_features", l),
              to_int(O, "out_features", l), to_int(N, "the row count", l),
              to_int(x.stride(0), "inputs' row stride", l), to_int(g.stride(0), "grads' row stride", l)};
    if (in == out_type && grouped_fn != nullptr) {
      grouped.push_back(p);
      continue;
    }
    // cuBLAS writes fp32 from any input type, and the input type itself; other outputs via fp32.
    const at::ScalarType c_type = (in == out_type || out_type == at::kFloat) ? out_type : at::kFloat;
    at::Tensor c = c_type == out_type ? outs[l] : at::empty({O, I}, grads[l].options().dtype(at::kFloat));
    p.C = c.data_ptr();
    gemm_one(handle, p, in, c_type);
    if (!c.is_same(outs[l])) outs[l].copy_(c);
  }
#if DFA_HAVE_GROUPED_GEMM
  if (grouped.size() == 1) {
    gemm_one(handle, grouped[0], out_type, out_type);
  } else if (!grouped.empty()) {
    gemm_grouped(handle, grouped_fn, grouped, out_type, device);
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
