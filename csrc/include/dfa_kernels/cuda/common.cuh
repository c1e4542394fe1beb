// Device code shared by the CUDA kernels (project.cuh, project_points.cuh): fp32/fp16/bf16 loads and
// stores picked at run time, and the SIMT GEMM tile of the projections.
//
// SIMT tile: a 256-thread block computes a [BM, 128] tile of F = e @ B, BM = 16 * TM, fp32 accumulate.
//   * Thread (tx, ty) = (tid % 16, tid / 16) owns rows ty * TM + [0, TM) and columns tx * 4 + [0, 4)
//     and 64 + tx * 4 + [0, 4): float4 shared reads of B are conflict-free and 4-wide stores of F
//     are coalesced.
//   * Each K step (kBK = 8 rows of B) thread tid fills row tid / 32 of the B tile, columns
//     tid % 32 + 32 q: a warp covers one row, so reads of a stored B are coalesced, and a generated
//     B keeps its 4 column keys in registers for the whole K loop (an entry costs one mix32).
//   * The e tile is converted to fp32 on load (fp32/fp16/bf16 inputs) and stored transposed.
//   * Double-buffered shared tiles: the next e values (and a stored B's) are loaded into registers
//     before the FMAs of the current tile, a generated B's after them (holding them across the FMAs
//     would cost registers, spills at TM = 8); all are stored after the FMAs; one barrier per step.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "dfa_kernels/cuda/compat.cuh"
#include "dfa_kernels/cuda/plan.h"
#include "dfa_kernels/hash.h"

namespace dfa_kernels {

// Activation/output dtypes are a runtime switch, not a template parameter: the branch is uniform
// and costs little next to the FMAs, while each instantiation of a GEMM kernel costs minutes of
// compile time.
enum class FpKind : int { F32 = 0, F16 = 1, BF16 = 2 };

__device__ __forceinline__ float load_fp(const void* src, int64_t idx, FpKind kind) {
  switch (kind) {
    case FpKind::F32: return static_cast<const float*>(src)[idx];
    case FpKind::F16: return static_cast<float>(static_cast<const c10::Half*>(src)[idx]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(src)[idx]);
  }
}

__device__ __forceinline__ void store_fp(void* dst, int64_t idx, float v, FpKind kind) {
  switch (kind) {
    case FpKind::F32: static_cast<float*>(dst)[idx] = v; break;
    case FpKind::F16: static_cast<c10::Half*>(dst)[idx] = c10::Half(v); break;
    default: static_cast<c10::BFloat16*>(dst)[idx] = c10::BFloat16(v); break;
  }
}

__device__ __forceinline__ uint32_t pack2(float a, float b, FpKind kind) {
  if (kind == FpKind::F16) {
    return static_cast<uint32_t>(c10::Half(a).x) | (static_cast<uint32_t>(c10::Half(b).x) << 16);
  }
  return static_cast<uint32_t>(c10::BFloat16(a).x) | (static_cast<uint32_t>(c10::BFloat16(b).x) << 16);
}

// dst[idx + q] = v[q] for q < n. With vec (n == 4 and dst + idx aligned to 4 elements) one 16-byte
// (fp32) or 8-byte (fp16/bf16) store.
__device__ __forceinline__ void store4(void* dst, int64_t idx, const float (&v)[4], int n, bool vec,
                                       FpKind kind) {
  if (vec) {
    if (kind == FpKind::F32) {
      vec_store(static_cast<float*>(dst) + idx, make_float4(v[0], v[1], v[2], v[3]));
    } else {
      vec_store(static_cast<uint16_t*>(dst) + idx, make_uint2(pack2(v[0], v[1], kind), pack2(v[2], v[3], kind)));
    }
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (q < n) store_fp(dst, idx + q, v[q], kind);
  }
}

// ---------------------------------------------------------------- SIMT GEMM tile
constexpr int kSimtPadA = 4;  // keeps the transposed e-tile stores conflict-free and rows 16-byte aligned

template <int TM>
struct SimtSmem {
  static constexpr int BM = 16 * TM;
  __align__(16) float As[2][kSimtBK][BM + kSimtPadA];  // e tile, transposed: [k][row]
  __align__(16) float Bs[2][kSimtBK][kSimtBN];
};

// B sources: a thread reads the 4 entries of one row of B at columns j0 + kStride * q (q < 4);
// the SIMT tile uses kStride = 32 (a warp covers a row of the tile), the narrow kernel kStride = 1.
//
// B generated from the hash: column j (tile coordinates) is column col_base + j of B; the 4 column
// keys are computed once (init) and kept in registers.
template <int kStride>
struct GeneratedB {
  Distribution dist;
  uint32_t skey, threshold;
  int64_t col_base;
  uint32_t ckey[4];
  static constexpr bool kPrefetch = false;  // pure computation: nothing to hide

  __device__ __forceinline__ void init(int64_t j0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      ckey[q] = col_key_for(dist, static_cast<uint32_t>(col_base + j0 + kStride * q));
    }
  }
  // v[q] = B[k, col_base + j0 + kStride q], 0 at columns j >= width.
  __device__ __forceinline__ void fetch(float (&v)[4], int64_t k, int64_t j0, int64_t width) const {
    const uint32_t rkey = row_key(skey, static_cast<uint32_t>(k));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + kStride * q;
      v[q] = j < width ? value_from_keys(dist, rkey, ckey[q], static_cast<uint32_t>(col_base + j), threshold)
                       : 0.0f;
    }
  }
};

// B read from memory: row-major [K, ldb] in `kind`, column j is column col_base + j.
template <int kStride>
struct StoredB {
  const void* B;
  int64_t ldb, col_base;
  FpKind kind;
  static constexpr bool kPrefetch = true;  // loads in flight during the FMAs

  __device__ __forceinline__ void init(int64_t) {}
  __device__ __forceinline__ void fetch(float (&v)[4], int64_t k, int64_t j0, int64_t width) const {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + kStride * q;
      v[q] = j < width ? load_fp(B, k * ldb + col_base + j, kind) : 0.0f;
    }
  }
};

// acc = e[row0 : row0 + BM, k_begin : k_end] @ B[k_begin : k_end, col0 : col0 + 128], where B's
// column j is bsrc's column j (bsrc reads 0 at j >= width) and rows past N read as 0. e is
// row-major [N, K]. Every thread must call it (it has barriers).
template <int TM, class BSource>
__device__ __forceinline__ void simt_gemm_tile(SimtSmem<TM>& sm, const void* e, FpKind e_kind, int64_t N,
                                               int64_t K, int64_t row0, int64_t col0, int64_t width,
                                               int64_t k_begin, int64_t k_end, BSource& bsrc,
                                               float (&acc)[TM][8]) {
  constexpr int BM = SimtSmem<TM>::BM;
  constexpr int kALoads = (BM * kSimtBK + kSimtThreads - 1) / kSimtThreads;  // e entries per thread
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int b_row = tid / 32, b_col = tid % 32;
  const int64_t j0 = col0 + b_col;
  bsrc.init(j0);

#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  // e entry idx = tid + l * threads is (row idx / kBK, k idx % kBK): a warp reads 4 rows x 8 k.
  float a_reg[kALoads];
  float b_reg[4];
  auto fetch_a = [&](int64_t k0) {
#pragma unroll
    for (int l = 0; l < kALoads; ++l) {
      const int idx = tid + l * kSimtThreads;
      const int64_t r = row0 + idx / kSimtBK;
      const int64_t k = k0 + idx % kSimtBK;
      a_reg[l] = (idx < BM * kSimtBK && r < N && k < k_end) ? load_fp(e, r * K + k, e_kind) : 0.0f;
    }
  };
  auto fetch_b = [&](int64_t k0) {
    const int64_t k = k0 + b_row;  // warp-uniform branch
    if (k < k_end) {
      bsrc.fetch(b_reg, k, j0, width);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) b_reg[q] = 0.0f;
    }
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int l = 0; l < kALoads; ++l) {
      const int idx = tid + l * kSimtThreads;
      if (idx < BM * kSimtBK) sm.As[buf][idx % kSimtBK][idx / kSimtBK] = a_reg[l];
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) sm.Bs[buf][b_row][b_col + 32 * q] = b_reg[q];
  };

  const int64_t num_tiles = ceil_div(k_end - k_begin, kSimtBK);
  if (num_tiles <= 0) return;
  fetch_a(k_begin);
  fetch_b(k_begin);
  store(0);
  __syncthreads();
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    const bool has_next = t + 1 < num_tiles;
    const int64_t k_next = k_begin + (t + 1) * kSimtBK;
    if (has_next) {
      fetch_a(k_next);  // loads in flight during the FMAs below
      if constexpr (BSource::kPrefetch) fetch_b(k_next);
    }
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float a[TM];
      if constexpr (TM % 4 == 0) {
#pragma unroll
        for (int i = 0; i < TM; i += 4) {
          const float4 v = vec_load<float4>(&sm.As[cur][kk][ty * TM + i]);
          a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = sm.As[cur][kk][ty * TM + i];
      }
      const float4 b0 = vec_load<float4>(&sm.Bs[cur][kk][tx * 4]);
      const float4 b1 = vec_load<float4>(&sm.Bs[cur][kk][64 + tx * 4]);
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    if (has_next) {
      if constexpr (!BSource::kPrefetch) fetch_b(k_next);
      store(cur ^ 1);  // the other buffer was last read before the previous barrier
    }
    __syncthreads();
  }
}

// Calls f(r, c, v, n) for each 4-column group of this thread's accumulators (tile at row0, col0)
// that starts inside [N, width): row r, column c, values v[4] of which the first
// n = min(4, width - c) are inside. Fully unrolled with guards (no early exits), so acc stays in
// registers.
template <int TM, class F>
__device__ __forceinline__ void simt_tile_epilogue(const float (&acc)[TM][8], int64_t row0, int64_t col0,
                                                   int64_t N, int64_t width, F&& f) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + ty * TM + i;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = col0 + h * 64 + tx * 4;
      if (r < N && c < width) {
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = acc[i][4 * h + q];
        f(r, c, v, static_cast<int>(std::min<int64_t>(4, width - c)));
      }
    }
  }
}

}  // namespace dfa_kernels
