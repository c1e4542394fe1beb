// Launch planning of the CUDA kernels as pure functions of the shapes and the device's numbers:
// which kernel, tile height, grid, split-K, e padding, column spans and point chunks. The .cu
// launchers and the CUDA-on-CPU harness (tests/cuda_on_cpu/) both call these, so the harness runs
// exactly the plans a GPU would (with the SM count it is given).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "dfa_kernels/spans.h"

namespace dfa_kernels {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What the plans need to know about the GPU.
struct DeviceCaps {
  int64_t sms;   // multiprocessors
  int cc_major;  // compute capability major (tensor-core WMMA path on >= 8)
};

// ---------------------------------------------------------------- kernel geometry
constexpr int kSimtThreads = 256;
constexpr int kSimtBN = 128;
constexpr int kSimtBK = 8;
constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32;
constexpr int kNarrowMaxK = 16;
constexpr int kNarrowThreads = 256;
constexpr int kNarrowBN = 128;
constexpr int kNarrowMaxRows = 256;  // rows per block: e tile <= 256 x 16 fp32 = 16 KiB of shared memory
constexpr int kMaxPoints = 64;       // project_points: point descriptors per launch (kernel parameters)
constexpr int kEpilogueThreads = 256;

// SIMT row tile height (TM) for N rows: a small N does not pay for 128-row tiles.
inline int simt_tm(int64_t N) { return N <= 16 ? 1 : (N <= 64 ? 4 : 8); }

// Split-K over gridDim.z when the tiles alone leave SMs idle (small N and width, long K): the K
// rows per split (a multiple of bk, the kernel's K step) and the number of non-empty splits. Each
// split covers at least 256 rows of B.
struct SplitK {
  int64_t k_per_split, splits;
};
inline SplitK plan_split_k(int64_t tiles, int64_t K, int64_t sms, int64_t bk) {
  constexpr int64_t kMaxSplits = 64;
  constexpr int64_t kMinRowsPerSplit = 256;
  int64_t s = 1;
  if (tiles < sms) {
    s = std::max<int64_t>(1, std::min<int64_t>({ceil_div(2 * sms, tiles), K / kMinRowsPerSplit, kMaxSplits}));
  }
  const int64_t k_per_split = ceil_div(ceil_div(K, bk), s) * bk;
  return {k_per_split, ceil_div(K, k_per_split)};
}

// ---------------------------------------------------------------- narrow out_features (K <= 16)
// Rows per block shrink until the grid has about 4 blocks per SM (a small N x W still fills the
// GPU), but stay >= 32 so the B block is reused by at least 4 rows per warp.
struct NarrowPlan {
  int kmax;  // K rounded up to 4, 8 or 16: K = 1..4 keeps 16 registers of B, not 64
  int64_t col_blocks, rows_per_block, blocks;
  size_t smem;  // the e tile, fp32, rows padded to a multiple of 4
};
inline NarrowPlan plan_narrow(int64_t N, int64_t K, int64_t W, const DeviceCaps& dev) {
  NarrowPlan p{};
  p.kmax = K <= 4 ? 4 : (K <= 8 ? 8 : 16);
  p.col_blocks = ceil_div(W, kNarrowBN);
  const int64_t want_row_blocks = ceil_div(4 * dev.sms, p.col_blocks);
  p.rows_per_block = std::clamp<int64_t>(ceil_div(ceil_div(N, want_row_blocks), 8) * 8, 32, kNarrowMaxRows);
  p.blocks = ceil_div(N, p.rows_per_block) * p.col_blocks;
  p.smem = static_cast<size_t>(p.rows_per_block) * static_cast<size_t>((K + 3) & ~int64_t{3}) * sizeof(float);
  return p;
}

// ---------------------------------------------------------------- virtual projection
enum class ProjectPath { Narrow, TensorCore, Simt };

struct ProjectPlan {
  ProjectPath path;
  NarrowPlan narrow;      // Narrow
  int tm;                 // Simt: rows per thread
  int64_t col_blocks, tiles;
  SplitK split;           // TensorCore, Simt
  int64_t lde;            // TensorCore: row stride of e (K, or K padded to a multiple of 8)
};

// N, W > 0 and K > 0 (the launchers answer the empty cases without a kernel).
inline ProjectPlan plan_project(int64_t N, int64_t K, int64_t W, bool e_16bit, const DeviceCaps& dev) {
  ProjectPlan p{};
  if (K <= kNarrowMaxK) {
    p.path = ProjectPath::Narrow;
    p.narrow = plan_narrow(N, K, W, dev);
    return p;
  }
  if (e_16bit && dev.cc_major >= 8) {  // tensor cores; e's rows padded to 16 bytes for vector loads
    p.path = ProjectPath::TensorCore;
    p.col_blocks = ceil_div(W, kTcBN);
    p.tiles = ceil_div(N, kTcBM) * p.col_blocks;
    p.split = plan_split_k(p.tiles, K, dev.sms, kTcBK);
    p.lde = K % 8 == 0 ? K : ceil_div(K, 8) * 8;
    return p;
  }
  p.path = ProjectPath::Simt;
  p.tm = simt_tm(N);
  p.col_blocks = ceil_div(W, kSimtBN);
  p.tiles = ceil_div(N, 16 * p.tm) * p.col_blocks;
  p.split = plan_split_k(p.tiles, K, dev.sms, kSimtBK);
  p.lde = K;
  return p;
}

// Grid of the epilogue / split-K reduction kernels (grid-stride loops).
inline int64_t epilogue_blocks(int64_t numel, int64_t max_blocks) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(numel, kEpilogueThreads), max_blocks));
}

// ---------------------------------------------------------------- project_points
// One launch (or kMaxPoints-point chunk) per column span of the points; every span uses the same
// SIMT tile height and its own split-K.
struct PointsSpanPlan {
  int64_t start, stop, col_blocks, tiles;
  SplitK split;
  std::vector<size_t> members;  // the points inside this span, in order
};
struct PointsPlan {
  int tm;
  std::vector<PointsSpanPlan> spans;
};

// ranges[l] = (offset, width) of point l.
inline PointsPlan plan_points(int64_t N, int64_t K, const std::vector<std::pair<int64_t, int64_t>>& ranges,
                              const DeviceCaps& dev) {
  PointsPlan plan{simt_tm(N), {}};
  const int64_t row_blocks = ceil_div(N, 16 * plan.tm);
  for (const auto& [start, stop] : column_spans(ranges)) {
    PointsSpanPlan s{start, stop, ceil_div(stop - start, kSimtBN), 0, {}, {}};
    s.tiles = row_blocks * s.col_blocks;
    s.split = plan_split_k(s.tiles, K, dev.sms, kSimtBK);
    for (size_t l = 0; l < ranges.size(); ++l) {
      const auto& [offset, width] = ranges[l];
      if (width > 0 && offset >= start && offset + width <= stop) s.members.push_back(l);
    }
    plan.spans.push_back(std::move(s));
  }
  return plan;
}

// ---------------------------------------------------------------- cuBLAS argument mapping
// A row-major product out[M, N] = A[M, K] @ B[K, N] as cuBLAS's column-major call:
// out^T [N, M] = B^T [N, K] @ A^T [K, M], so cuBLAS's (m, n, k) = (N, M, K), its first operand is
// B (leading dimension ldb) and its second A (lda), no transposes; ldc = N.
struct ColMajorGemm {
  bool trans_a, trans_b;  // of cuBLAS's first and second operand
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* c;
  int64_t ldc;
};
inline ColMajorGemm rowmajor_gemm(const void* A, int64_t lda, const void* B, int64_t ldb, void* out, int64_t M,
                                  int64_t N, int64_t K) {
  return {false, false, N, M, K, B, ldb, A, lda, out, N};
}

// The weight gradient out[O, I] = grads^T [O, N] @ inputs [N, I] (row-major): column-major
// C [I, O] = inputs^T-as-stored [I, N] (no transpose) @ (grads as [O, N])^T, i.e. cuBLAS
// (m, n, k) = (I, O, N) with the second operand transposed.
inline ColMajorGemm weight_grad_gemm(const void* grads, int64_t ld_grads, const void* inputs, int64_t ld_inputs,
                                     void* out, int64_t N, int64_t O, int64_t I) {
  return {false, true, I, O, N, inputs, ld_inputs, grads, ld_grads, out, I};
}

// cuBLAS takes an operand as is when its columns are unit-stride, its leading dimension covers a
// row, and (16-bit types) it starts 16-byte aligned (a column slice can start mid-row).
inline bool gemm_operand_ok(int64_t cols, int64_t stride0, int64_t stride1, uintptr_t address) {
  return (cols <= 1 || stride1 == 1) && stride0 >= std::max<int64_t>(1, cols) && address % 16 == 0;
}

}  // namespace dfa_kernels
