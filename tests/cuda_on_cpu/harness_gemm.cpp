// grouped_weight_grad as csrc/cuda/grouped_weight_grad.cu runs it (operand copies, grouping, the
// fill kernel on the emulator, the grouped call), and the host GEMMs that stand in for cuBLAS.
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "dfa_kernels/cuda/gemm.cuh"
#include "harness.h"

namespace harness {
namespace {

float load(const void* p, int64_t idx, cudaDataType_t t) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(p)[idx];
    case CUDA_R_16F: return static_cast<float>(static_cast<const c10::Half*>(p)[idx]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[idx]);
  }
}

void store(void* p, int64_t idx, float v, cudaDataType_t t) {
  switch (t) {
    case CUDA_R_32F: static_cast<float*>(p)[idx] = v; break;
    case CUDA_R_16F: static_cast<c10::Half*>(p)[idx] = c10::Half(v); break;
    default: static_cast<c10::BFloat16*>(p)[idx] = c10::BFloat16(v); break;
  }
}

cublasStatus_t reject(const char* why, int a, int b) {
  std::fprintf(stderr, "host GEMM: rejected (%s: %d < %d), as cuBLAS would (CUBLAS_STATUS_INVALID_VALUE)\n", why, a, b);
  return CUBLAS_STATUS_INVALID_VALUE;
}

bool supported(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF; }

}  // namespace

// Column-major C[m, n] = alpha * op(A) @ op(B) + beta * C (cuBLAS's conventions and checks).
cublasStatus_t host_gemm_ex(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                            cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
  if (m < 0 || n < 0 || k < 0) return reject("negative size", std::min({m, n, k}), 0);
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k)) return reject("lda", lda, std::max(1, ta == CUBLAS_OP_N ? m : k));
  if (ldb < std::max(1, tb == CUBLAS_OP_N ? k : n)) return reject("ldb", ldb, std::max(1, tb == CUBLAS_OP_N ? k : n));
  if (ldc < std::max(1, m)) return reject("ldc", ldc, std::max(1, m));
  if (!supported(at) || at != bt || !supported(ct) || (ct != CUDA_R_32F && ct != at) || compute != CUBLAS_COMPUTE_32F) {
    return reject("type combination", 0, 1);
  }
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float s = 0.0f;
      for (int kk = 0; kk < k; ++kk) {
        const float x = load(A, ta == CUBLAS_OP_N ? i + int64_t{kk} * lda : kk + int64_t{i} * lda, at);
        const float y = load(B, tb == CUBLAS_OP_N ? kk + int64_t{j} * ldb : j + int64_t{kk} * ldb, bt);
        s = fmaf(x, y, s);
      }
      const int64_t idx = i + int64_t{j} * ldc;
      store(C, idx, b == 0.0f ? a * s : a * s + b * load(C, idx, ct), ct);
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

// The pointer arrays are read as the GPU would: from the "device" memory the fill kernel wrote.
cublasStatus_t host_gemm_grouped(cublasHandle_t h, const cublasOperation_t ta[], const cublasOperation_t tb[],
                                 const int m[], const int n[], const int k[], const void* alpha, const void* const A[],
                                 cudaDataType_t at, const int lda[], const void* const B[], cudaDataType_t bt,
                                 const int ldb[], const void* beta, void* const C[], cudaDataType_t ct, const int ldc[],
                                 int groups, const int group_size[], cublasComputeType_t compute) {
  if (groups < 1) return reject("group_count", groups, 1);
  if (at != bt || bt != ct) return reject("grouped GEMM needs one type for A, B and C", 0, 1);
  int i = 0;
  for (int g = 0; g < groups; ++g) {
    for (int s = 0; s < group_size[g]; ++s, ++i) {
      const cublasStatus_t st = host_gemm_ex(h, ta[g], tb[g], m[g], n[g], k[g], static_cast<const float*>(alpha) + g,
                                             A[i], at, lda[g], B[i], bt, ldb[g], static_cast<const float*>(beta) + g,
                                             C[i], ct, ldc[g], compute, CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS) return st;
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Per layer l (comma-separated): N, O, I, the row strides ld_g / ld_x and element offsets off_g /
// off_x of grads[l] [N, O] and inputs[l] [N, I] inside their files (a column slice is a row stride
// above the width; an odd offset a misaligned start), the files g / x, and the out files. One dtype
// (kind) for the inputs, out_kind for the outputs; grouped=0 forces one GEMM per layer (no grouped
// cuBLAS, or a stream being captured).
std::string run_grouped_weight_grad(const Case& c) {
  const auto Ns = c.list("N"), Os = c.list("O"), Is = c.list("I"), ld_g = c.list("ld_g"), ld_x = c.list("ld_x"),
             off_g = c.list("off_g"), off_x = c.list("off_x"), gs = c.list("g"), xs = c.list("x"), outs = c.list("outs");
  const std::string kind = c.str("kind"), out_kind = c.str("out_kind");
  const bool use_grouped = c.i64("grouped") != 0;
  const size_t eb = elem_bytes(kind), ob = elem_bytes(out_kind);
  const cudaDataType_t in_t = cuda_type_of(kind), out_t = cuda_type_of(out_kind);
  std::vector<Mem> keep, out_mem;
  std::vector<dfa_kernels::ColMajorGemm> grouped;
  struct Cast {  // an fp32 result for a 16-bit output of another type, cast after (as the .cu's copy_)
    Mem f32;
    size_t layer, numel;
  };
  std::vector<Cast> casts;
  // operand [rows, cols] with row stride ld at element offset off of its file: taken as is when
  // cuBLAS can (plan.h), else copied contiguous, as the .cu's gemm_operand.
  auto operand = [&](const std::string& file, int64_t rows, int64_t cols, int64_t ld, int64_t off) -> std::pair<const void*, int64_t> {
    const size_t file_elems = rows == 0 ? static_cast<size_t>(off) : static_cast<size_t>(off + (rows - 1) * ld + cols);
    keep.push_back(Mem::read(file, file_elems * eb));
    const unsigned char* base = keep.back().bytes.get() + off * eb;
    if (dfa_kernels::gemm_operand_ok(cols, ld, 1, reinterpret_cast<uintptr_t>(base))) return {base, ld};
    Mem copy = Mem::alloc(static_cast<size_t>(rows * cols) * eb);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(copy.bytes.get() + r * cols * eb, base + r * ld * eb, cols * eb);
    keep.push_back(std::move(copy));
    return {keep.back().bytes.get(), std::max<int64_t>(cols, 1)};
  };
  int copies = 0;
  for (size_t l = 0; l < Ns.size(); ++l) {
    const int64_t N = std::stoll(Ns[l]), O = std::stoll(Os[l]), I = std::stoll(Is[l]);
    out_mem.push_back(Mem::alloc(static_cast<size_t>(O * I) * ob));
    if (N == 0) std::memset(out_mem.back().bytes.get(), 0, out_mem.back().size);
    if (N == 0 || O == 0 || I == 0) continue;
    const size_t kept = keep.size();
    const auto [x, xld] = operand(xs[l], N, I, std::stoll(ld_x[l]), std::stoll(off_x[l]));
    const auto [g, gld] = operand(gs[l], N, O, std::stoll(ld_g[l]), std::stoll(off_g[l]));
    copies += static_cast<int>(keep.size() - kept) - 2;
    auto gemm = dfa_kernels::weight_grad_gemm(g, gld, x, xld, out_mem.back().bytes.get(), N, O, I);
    if (kind == out_kind && use_grouped) {
      grouped.push_back(gemm);
      continue;
    }
    const bool via_f32 = !(kind == out_kind || out_kind == "f32");
    if (via_f32) {
      casts.push_back({Mem::alloc(static_cast<size_t>(O * I) * 4), l, static_cast<size_t>(O * I)});
      gemm.c = casts.back().f32.bytes.get();
    }
    if (dfa_kernels::call_gemm(host_gemm_ex, nullptr, gemm, in_t, via_f32 ? CUDA_R_32F : out_t, 1.0f) != CUBLAS_STATUS_SUCCESS) {
      throw std::runtime_error("a per-layer GEMM was rejected");
    }
  }
  std::string how = "none";
  if (grouped.size() == 1) {
    how = "single";
    if (dfa_kernels::call_gemm(host_gemm_ex, nullptr, grouped[0], out_t, out_t, 1.0f) != CUBLAS_STATUS_SUCCESS) {
      throw std::runtime_error("the GEMM call was rejected");
    }
  } else if (!grouped.empty()) {
    const auto args = dfa_kernels::plan_grouped_gemm(grouped);
    Mem dev_ptrs = Mem::alloc(args.ptrs.size() * sizeof(int64_t));
    if (dfa_kernels::call_grouped_gemm(host_gemm_grouped, nullptr, args, dev_ptrs.as<int64_t>(), out_t, nullptr) !=
        CUBLAS_STATUS_SUCCESS) {
      throw std::runtime_error("the grouped GEMM call was rejected");
    }
    how = "grouped, " + std::to_string(args.group_size.size()) + " groups";
  }
  for (auto& cast : casts) {
    for (size_t i = 0; i < cast.numel; ++i) store(out_mem[cast.layer].bytes.get(), static_cast<int64_t>(i), cast.f32.as<float>()[i], out_t);
  }
  for (size_t l = 0; l < outs.size(); ++l) out_mem[l].write(outs[l]);
  return "\"path\": \"" + how + "\", \"operand_copies\": " + std::to_string(copies);
}

}  // namespace harness
