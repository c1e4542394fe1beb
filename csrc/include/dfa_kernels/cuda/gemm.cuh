// The cuBLAS calls of the CUDA backend, written once for csrc/cuda/*.cu and for the CUDA-on-CPU
// harness, which passes a host GEMM with cuBLAS's signatures and checks (tests/cuda_on_cpu/):
//   * call_gemm: one column-major product (plan.h maps row-major products onto it);
//   * the grouped weight gradient: layers of one shape form one group of
//     cublasGemmGroupedBatchedEx, whose device pointer arrays are written by fill_kernel from its
//     parameters (no host-to-device copy, and a CUDA graph replays the same values).
#pragma once

#include <cublas_v2.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include "dfa_kernels/cuda/compat.cuh"
#include "dfa_kernels/cuda/plan.h"

namespace dfa_kernels {
// Internal linkage: each launcher (.cu, or harness) file that includes this header has its own
// copy of the kernels, as a .cu without relocatable device code must.
namespace {

// cublasGemmEx's signature with a compute type (C++ also declares a legacy overload).
using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                    const void*, cudaDataType_t, int, const void*, cudaDataType_t, int, const void*,
                                    void*, cudaDataType_t, int, cublasComputeType_t, cublasGemmAlgo_t);
using GroupedGemmFn = cublasStatus_t (*)(cublasHandle_t, const cublasOperation_t[], const cublasOperation_t[],
                                         const int[], const int[], const int[], const void*, const void* const[],
                                         cudaDataType_t, const int[], const void* const[], cudaDataType_t, const int[],
                                         const void*, void* const[], cudaDataType_t, const int[], int, const int[],
                                         cublasComputeType_t);

// alpha * op(a) @ op(b) -> c, fp32 compute; a, b of type `in`, c of type `out`.
inline cublasStatus_t call_gemm(GemmExFn gemm, cublasHandle_t handle, const ColMajorGemm& g, cudaDataType_t in,
                         cudaDataType_t out, float alpha) {
  const float beta = 0.0f;
  return gemm(handle, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
              static_cast<int>(g.m), static_cast<int>(g.n), static_cast<int>(g.k), &alpha, g.a, in,
              static_cast<int>(g.lda), g.b, in, static_cast<int>(g.ldb), &beta, g.c, out, static_cast<int>(g.ldc),
              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

// cublasGemmGroupedBatchedEx's host arrays for a set of products of one data type: products of one
// shape (and transposes, leading dimensions) share a group.
struct GroupedGemmArgs {
  std::vector<cublasOperation_t> trans_a, trans_b;
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<float> alpha, beta;
  std::vector<int64_t> ptrs;  // every A pointer, then every B, then every C, group by group
  size_t count = 0;
};

inline GroupedGemmArgs plan_grouped_gemm(const std::vector<ColMajorGemm>& products) {
  std::map<std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>, std::vector<const ColMajorGemm*>>
      groups;
  for (const ColMajorGemm& g : products) groups[{g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc}].push_back(&g);
  GroupedGemmArgs a;
  a.count = products.size();
  a.ptrs.assign(3 * a.count, 0);
  size_t i = 0;
  for (const auto& [shape, members] : groups) {
    const ColMajorGemm& g = *members.front();
    a.trans_a.push_back(g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
    a.trans_b.push_back(g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
    a.m.push_back(static_cast<int>(g.m));
    a.n.push_back(static_cast<int>(g.n));
    a.k.push_back(static_cast<int>(g.k));
    a.lda.push_back(static_cast<int>(g.lda));
    a.ldb.push_back(static_cast<int>(g.ldb));
    a.ldc.push_back(static_cast<int>(g.ldc));
    a.group_size.push_back(static_cast<int>(members.size()));
    a.alpha.push_back(1.0f);
    a.beta.push_back(0.0f);
    for (const ColMajorGemm* p : members) {
      a.ptrs[i] = reinterpret_cast<int64_t>(p->a);
      a.ptrs[a.count + i] = reinterpret_cast<int64_t>(p->b);
      a.ptrs[2 * a.count + i] = reinterpret_cast<int64_t>(p->c);
      ++i;
    }
  }
  return a;
}

// Up to kFillMax 8-byte values written to device memory by one launch that carries them in its
// parameters (3840 B of the 4 KiB parameter space).
constexpr int kFillMax = 480;
struct FillParams {
  int64_t values[kFillMax];
  int count;
};
static_assert(sizeof(FillParams) <= 4096, "FillParams must fit the 4 KiB kernel parameter space");

__global__ void fill_kernel(int64_t* dst, const __grid_constant__ FillParams p) {
  for (int i = threadIdx.x; i < p.count; i += blockDim.x) dst[i] = p.values[i];
}

// dst[0 : values.size()] = values, in launches of kFillMax.
inline void launch_fill(int64_t* dst, const std::vector<int64_t>& values, cudaStream_t stream) {
  for (size_t first = 0; first < values.size(); first += kFillMax) {
    FillParams fp{};
    fp.count = static_cast<int>(std::min<size_t>(kFillMax, values.size() - first));
    std::copy(values.begin() + first, values.begin() + first + fp.count, fp.values);
    launch_kernel(fill_kernel, dim3(1), dim3(256), 0, stream, dst + first, fp);
  }
}

// Every product in one grouped call; dev_ptrs is device memory for args.ptrs (3 * count int64s),
// written here. All operands are of type t.
inline cublasStatus_t call_grouped_gemm(GroupedGemmFn grouped, cublasHandle_t handle, const GroupedGemmArgs& a, int64_t* dev_ptrs,
                                 cudaDataType_t t, cudaStream_t stream) {
  launch_fill(dev_ptrs, a.ptrs, stream);
  const auto* arrays = reinterpret_cast<void* const*>(dev_ptrs);
  return grouped(handle, a.trans_a.data(), a.trans_b.data(), a.m.data(), a.n.data(), a.k.data(), a.alpha.data(),
                 arrays, t, a.lda.data(), arrays + a.count, t, a.ldb.data(), a.beta.data(),
                 arrays + 2 * a.count, t, a.ldc.data(), static_cast<int>(a.group_size.size()),
                 a.group_size.data(), CUBLAS_COMPUTE_32F);
}

}  // namespace
}  // namespace dfa_kernels
