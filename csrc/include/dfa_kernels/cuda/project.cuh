// The projection kernels and their launch sequences, without ATen (csrc/cuda/project.cu allocates
// and checks; the CUDA-on-CPU harness calls the same launch functions).
//
// Virtual projection F[N, W] = scale * (e @ B) * col_scale, one of three kernels (plan_project):
//   * out_features K <= 16: the narrow kernel (an outer product, bound by writing F);
//   * fp16/bf16 e on sm_80+: tensor cores (WMMA); e is copied to a row stride that is a multiple of
//     8 when K is not (GPT-2's 50257), so its rows load as 16-byte vectors;
//   * otherwise the SIMT GEMM tile of common.cuh (fp32 FMAs, any dtype). Consecutive blocks share a
//     row block, so its e tiles are reused from L2.
//   Both GEMM kernels split K over gridDim.z when the tile grid cannot fill the GPU (small N and
//   width, long K), into an fp32 workspace [splits, N, W] that a second kernel sums in a fixed
//   order (deterministic).
#pragma once

#include <type_traits>

#include "dfa_kernels/cuda/common.cuh"

namespace dfa_kernels {
// Internal linkage: each launcher (.cu, or harness) file that includes this header has its own
// copy of the kernels, as a .cu without relocatable device code must.
namespace {

struct ProjectParams {
  const void* e;           // [N, K] row-major (row stride lde on the tensor-core path), in_kind
  void* out;               // [N, W] out dtype; written when partial == nullptr
  float* partial;          // split-K: [gridDim.z, N, W] raw fp32 sums, else nullptr
  const float* col_scale;  // [W] or nullptr
  int64_t N, K, W;
  int64_t lde;             // row stride of e (tensor-core path: K, or K padded to a multiple of 8)
  int64_t k_per_split;     // multiple of the kernel's K step (kSimtBK, kTcBK)
  int64_t col_blocks;
  float scale;
  uint32_t skey, threshold;
  Distribution dist;
  FpKind in_kind, out_kind;
  bool e_vec16;            // tensor-core path: rows of e start 16-byte aligned (16-byte loads)
};

template <int TM>
__global__ void __launch_bounds__(kSimtThreads, 2) project_virtual_kernel(const ProjectParams p) {
  DFA_SHARED(SimtSmem<TM>, sm);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.col_blocks) * SimtSmem<TM>::BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x % p.col_blocks) * kSimtBN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = std::min(p.K, k_begin + p.k_per_split);
  GeneratedB<32> bsrc{p.dist, p.skey, p.threshold, 0, {}};
  float acc[TM][8];
  simt_gemm_tile<TM>(sm, p.e, p.in_kind, p.N, p.K, row0, col0, p.W, k_begin, k_end, bsrc, acc);

  const bool vec = (p.W % 4) == 0;  // 4-wide stores stay aligned
  if (p.partial != nullptr) {
    float* partial = p.partial + static_cast<int64_t>(blockIdx.z) * p.N * p.W;
    simt_tile_epilogue<TM>(acc, row0, col0, p.N, p.W, [&](int64_t r, int64_t c, float (&v)[4], int n) {
      store4(partial, r * p.W + c, v, n, vec && n == 4, FpKind::F32);
    });
  } else {
    simt_tile_epilogue<TM>(acc, row0, col0, p.N, p.W, [&](int64_t r, int64_t c, float (&v)[4], int n) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        v[q] *= p.scale;
        if (p.col_scale != nullptr && q < n) v[q] *= p.col_scale[c + q];
      }
      store4(p.out, r * p.W + c, v, n, vec && n == 4, p.out_kind);
    });
  }
}

// out = cast((sum_z partial[z] * scale) * col_scale): the split-K reduction (fixed order) and the
// epilogue of the materialized projection (splits = 1, where out may alias partial).
__global__ void epilogue_kernel(const float* partial, int splits, int64_t numel, int64_t W, float scale,
                                const float* __restrict__ col_scale, void* out, FpKind kind) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += partial[z * numel + idx];
    float v = s * scale;
    if (col_scale != nullptr) v *= col_scale[idx % W];
    store_fp(out, idx, v, kind);
  }
}

// out [numel / W, W] from `splits` slices of partial.
inline void launch_epilogue(const float* partial, int splits, int64_t numel, int64_t W, float scale,
                            const float* col_scale, void* out, FpKind kind, cudaStream_t stream) {
  launch_kernel(epilogue_kernel, dim3(static_cast<unsigned>(epilogue_blocks(numel, 65536))), dim3(kEpilogueThreads),
                0, stream, partial, splits, numel, W, scale, col_scale, out, kind);
}

// ---------------------------------------------------------------- tensor-core path (fp16/bf16 e)
// F = e @ B with WMMA 16x16x16 (fp32 accumulate), B generated into shared memory in e's dtype:
// exact for rademacher and sparse (+-1, 0); uniform and gaussian entries are rounded to fp16/bf16
// (relative error <= 2^-11 / 2^-8 per entry).
//   * A 256-thread block computes a [128, 128] tile; warp w owns rows (w / 4) * 64 + [0, 64) and
//     columns (w % 4) * 32 + [0, 32): 4 x 2 accumulator fragments.
//   * K steps of 32. Thread tid loads 16 consecutive k of e row tid / 2 (two 16-byte loads when K
//     is a multiple of 8) and generates 16 consecutive columns of B row tid / 8: their 16 column
//     keys stay in registers, and for rademacher the 16 entries are 16 bits of one hash word.
//   * Double-buffered: the next e values are loaded before the MMAs of the current step and the
//     next B values are generated after them (ALU work overlapping the tensor cores).
//   * Epilogue: each warp stages one 16x16 fragment at a time in shared memory (aliasing the tiles)
//     and writes it with scale, col_scale and the output cast.
constexpr int kTcLdA = kTcBK + 8;  // 16-bit entries; the 16-byte row pad breaks bank conflicts
constexpr int kTcLdB = kTcBN + 8;
constexpr int kTcLdC = 16 + 4;     // fp32 entries

// 16-bit tiles as raw bits (__half has constructors, which a __shared__ union cannot hold). Every
// fragment pointer is 32-byte aligned: rows of A/B tiles are 80 / 272 bytes, fragments start at
// multiples of 16 rows and 16 columns.
struct __align__(32) TcSmem {
  union {
    struct {
      uint16_t A[2][kTcBM][kTcLdA];
      uint16_t B[2][kTcBK][kTcLdB];
    } tiles;
    float C[kSimtThreads / 32][16][kTcLdC];
  };
};
static_assert(sizeof(TcSmem) <= 48 * 1024, "tensor-core tiles over the 48 KiB of static shared memory");

template <typename T>
__device__ __forceinline__ uint16_t to_bits(float v);
template <>
__device__ __forceinline__ uint16_t to_bits<__half>(float v) { return __half_as_ushort(__float2half_rn(v)); }
template <>
__device__ __forceinline__ uint16_t to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

__device__ __forceinline__ uint4 pack16(const uint16_t (&v)[8]) {
  return make_uint4(v[0] | (uint32_t{v[1]} << 16), v[2] | (uint32_t{v[3]} << 16), v[4] | (uint32_t{v[5]} << 16),
                    v[6] | (uint32_t{v[7]} << 16));
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) project_tc_kernel(const ProjectParams p) {
#if DFA_HAS_WMMA
  using namespace nvcuda;
  DFA_SHARED(TcSmem, sm);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.col_blocks) * kTcBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x % p.col_blocks) * kTcBN;
  // Split-K: this block's rows of B, [k_begin, k_end); k_per_split is a multiple of kTcBK, so only
  // the last split's last step reaches past K (masked by K below).
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = std::min(p.K, k_begin + p.k_per_split);

  const int a_row = tid / 2, a_k = (tid % 2) * 16;
  const int64_t ar = row0 + a_row;
  const uint16_t* e_row = static_cast<const uint16_t*>(p.e) + ar * p.lde;
  uint4 a_reg[2];
  auto fetch_a = [&](int64_t k0) {
    const int64_t k = k0 + a_k;
    if (p.e_vec16 && ar < p.N && k + 16 <= p.lde) {
      a_reg[0] = vec_load<uint4>(e_row + k);
      a_reg[1] = vec_load<uint4>(e_row + k + 8);
    } else {
      uint16_t v[2][8];
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i / 8][i % 8] = (ar < p.N && k + i < p.K) ? e_row[k + i] : uint16_t{0};
      a_reg[0] = pack16(v[0]);
      a_reg[1] = pack16(v[1]);
    }
  };

  const int b_row = tid / 8, b_col = (tid % 8) * 16;
  const int64_t j0 = col0 + b_col;  // a multiple of 16: rademacher's 16 entries share one hash word
  const bool rademacher = p.dist == Distribution::Rademacher;
  uint32_t ckey[16];
#pragma unroll
  for (int q = 0; q < 16; ++q) ckey[q] = col_key_for(p.dist, static_cast<uint32_t>(j0 + q));
  uint4 b_reg[2];
  auto gen_b = [&](int64_t k0) {
    const int64_t k = k0 + b_row;
    uint16_t v[2][8];
    if (k < p.K) {
      const uint32_t rkey = row_key(p.skey, static_cast<uint32_t>(k));
      if (rademacher) {
        constexpr uint16_t one = std::is_same_v<T, __half> ? 0x3c00 : 0x3f80;  // +1.0; sign bit 15
        const uint32_t w = hash_from_keys(rkey, ckey[0]) >> (j0 & 31);
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          v[q / 8][q % 8] = j0 + q < p.W ? static_cast<uint16_t>(one | ((~w >> q & 1u) << 15)) : uint16_t{0};
        }
      } else {
#pragma unroll
        for (int q = 0; q < 16; ++q) {
          const int64_t j = j0 + q;
          v[q / 8][q % 8] = to_bits<T>(
              j < p.W ? value_from_keys(p.dist, rkey, ckey[q], static_cast<uint32_t>(j), p.threshold) : 0.0f);
        }
      }
    } else {
#pragma unroll
      for (int q = 0; q < 16; ++q) v[q / 8][q % 8] = 0;
    }
    b_reg[0] = pack16(v[0]);
    b_reg[1] = pack16(v[1]);
  };
  auto store = [&](int buf) {
    vec_store(&sm.tiles.A[buf][a_row][a_k], a_reg[0]);
    vec_store(&sm.tiles.A[buf][a_row][a_k + 8], a_reg[1]);
    vec_store(&sm.tiles.B[buf][b_row][b_col], b_reg[0]);
    vec_store(&sm.tiles.B[buf][b_row][b_col + 8], b_reg[1]);
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  const int64_t num_tiles = ceil_div(k_end - k_begin, kTcBK);
  fetch_a(k_begin);
  gen_b(k_begin);
  store(0);
  __syncthreads();
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    const bool has_next = t + 1 < num_tiles;
    if (has_next) fetch_a(k_begin + (t + 1) * kTcBK);
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wmma::load_matrix_sync(af[i], reinterpret_cast<const T*>(&sm.tiles.A[cur][wm * 64 + i * 16][kk]), kTcLdA);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(bf[j], reinterpret_cast<const T*>(&sm.tiles.B[cur][kk][wn * 32 + j * 16]), kTcLdB);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
      }
    }
    if (has_next) {
      gen_b(k_begin + (t + 1) * kTcBK);
      store(cur ^ 1);  // last read before the previous barrier
    }
    __syncthreads();
  }

  // The loop ended with a barrier, so the staging buffer may overwrite the tiles. Split-K writes
  // raw fp32 sums into its slice of the workspace; the reduction applies scale and col_scale.
  float* partial = p.partial != nullptr ? p.partial + static_cast<int64_t>(blockIdx.z) * p.N * p.W : nullptr;
  float* stage = &sm.C[warp][0][0];
  const int r = lane / 2, cc = (lane % 2) * 8;
  const bool vec = (p.W % 4) == 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], kTcLdC, wmma::mem_row_major);
      __syncwarp();
      const int64_t gr = row0 + wm * 64 + i * 16 + r;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = col0 + wn * 32 + j * 16 + cc + 4 * h;
        if (gr < p.N && c < p.W) {
          const int n = static_cast<int>(std::min<int64_t>(4, p.W - c));
          float v[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) v[q] = stage[r * kTcLdC + cc + 4 * h + q];
          if (partial != nullptr) {
            store4(partial, gr * p.W + c, v, n, vec && n == 4, FpKind::F32);
          } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              v[q] *= p.scale;
              if (p.col_scale != nullptr && q < n) v[q] *= p.col_scale[c + q];
            }
            store4(p.out, gr * p.W + c, v, n, vec && n == 4, p.out_kind);
          }
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // the host dispatches here only on sm_80+
#endif
}

// ---------------------------------------------------------------- narrow out_features (K <= 16)
// F = e @ B with K <= 16 (recommender K = 1, NeRF 4, graph classes) is an outer product whose cost
// is writing F. A 256-thread block owns rows [row0, row0 + rows_per_block) x 128 columns: lane l of
// every warp holds B[0:K, c : c + 4] (c = col0 + 4 l) in registers, generated or loaded once per
// block; e's rows are staged in shared memory as fp32 (zero-padded to a multiple of 4 columns, read
// as broadcast float4s); warp w computes rows w, w + 8, ..., each a 128-column segment of one row
// written with 16-byte (fp32) or 8-byte (fp16/bf16) stores, fully coalesced.
struct NarrowParams {
  const void* e;           // [N, K] row-major
  void* out;               // [N, W]
  const float* col_scale;  // [W] or nullptr
  int64_t N, K, W, rows_per_block, col_blocks;
  float scale;
  FpKind e_kind, out_kind;
};

template <int KMAX, class BSource>
__global__ void __launch_bounds__(kNarrowThreads) project_narrow_kernel(const NarrowParams p, BSource bsrc) {
  DFA_EXTERN_SHARED(float4, es4);  // e tile [rows_per_block][ldk / 4]
  float* es = reinterpret_cast<float*>(es4);
  const int K = static_cast<int>(p.K);
  const int ldk = (K + 3) & ~3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.col_blocks) * p.rows_per_block;
  const int64_t c = static_cast<int64_t>(blockIdx.x % p.col_blocks) * kNarrowBN + (threadIdx.x % 32) * 4;
  const int64_t rows = std::min(p.rows_per_block, p.N - row0);

  // e is contiguous, so the tile's rows are one run of rows * K entries: coalesced loads.
  for (int64_t idx = threadIdx.x; idx < rows * ldk; idx += kNarrowThreads) {
    const int64_t r = idx / ldk;
    const int k = static_cast<int>(idx % ldk);
    es[idx] = k < K ? load_fp(p.e, (row0 + r) * K + k, p.e_kind) : 0.0f;
  }
  float b[KMAX][4];
  bsrc.init(c);
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    if (k < K) {
      bsrc.fetch(b[k], k, c, p.W);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) b[k][q] = 0.0f;  // meets e's zero padding: no NaN from 0 * garbage
    }
  }
  float cs[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) cs[q] = (p.col_scale != nullptr && c + q < p.W) ? p.col_scale[c + q] : 1.0f;
  __syncthreads();
  if (c >= p.W) return;

  const int n = static_cast<int>(std::min<int64_t>(4, p.W - c));
  const bool vec = (p.W % 4) == 0;  // then n == 4 and the stores are aligned
  for (int64_t r = threadIdx.x / 32; r < rows; r += kNarrowThreads / 32) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k4 = 0; k4 < KMAX; k4 += 4) {
      if (k4 < ldk) {
        const float4 a = vec_load<float4>(&es4[(r * ldk + k4) / 4]);  // same address across the warp: a broadcast
        const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[q] = fmaf(av[kk], b[k4 + kk][q], acc[q]);
        }
      }
    }
    float v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = (acc[q] * p.scale) * cs[q];
    store4(p.out, (row0 + r) * p.W + c, v, n, vec, p.out_kind);
  }
}

// p.rows_per_block and p.col_blocks come from the plan (set here).
template <class BSource>
void launch_narrow(const NarrowPlan& plan, NarrowParams p, const BSource& bsrc, cudaStream_t stream) {
  p.rows_per_block = plan.rows_per_block;
  p.col_blocks = plan.col_blocks;
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  switch (plan.kmax) {
    case 4: launch_kernel(project_narrow_kernel<4, BSource>, grid, dim3(kNarrowThreads), plan.smem, stream, p, bsrc); break;
    case 8: launch_kernel(project_narrow_kernel<8, BSource>, grid, dim3(kNarrowThreads), plan.smem, stream, p, bsrc); break;
    default: launch_kernel(project_narrow_kernel<16, BSource>, grid, dim3(kNarrowThreads), plan.smem, stream, p, bsrc); break;
  }
}

// The virtual projection's GEMM paths (TensorCore, Simt) as planned. p.e must be the e of the plan
// (padded to plan.lde rows on the tensor-core path), p.partial a workspace of plan.split.splits * N * W
// floats when splits > 1; col_blocks and k_per_split are set here.
inline void launch_project_gemm(const ProjectPlan& plan, ProjectParams p, cudaStream_t stream) {
  p.col_blocks = plan.col_blocks;
  p.k_per_split = plan.split.k_per_split;
  p.lde = plan.lde;
  const dim3 grid(static_cast<unsigned>(plan.tiles), 1, static_cast<unsigned>(plan.split.splits));
  if (plan.path == ProjectPath::TensorCore) {
    p.e_vec16 = reinterpret_cast<uintptr_t>(p.e) % 16 == 0;
    if (p.in_kind == FpKind::F16) {
      launch_kernel(project_tc_kernel<__half>, grid, dim3(kSimtThreads), 0, stream, p);
    } else {
      launch_kernel(project_tc_kernel<__nv_bfloat16>, grid, dim3(kSimtThreads), 0, stream, p);
    }
  } else {
    switch (plan.tm) {
      case 1: launch_kernel(project_virtual_kernel<1>, grid, dim3(kSimtThreads), 0, stream, p); break;
      case 4: launch_kernel(project_virtual_kernel<4>, grid, dim3(kSimtThreads), 0, stream, p); break;
      default: launch_kernel(project_virtual_kernel<8>, grid, dim3(kSimtThreads), 0, stream, p); break;
    }
  }
  if (plan.split.splits > 1) {
    launch_epilogue(p.partial, static_cast<int>(plan.split.splits), p.N * p.W, p.W, p.scale, p.col_scale, p.out,
                    p.out_kind, stream);
  }
}

// ---------------------------------------------------------------- feedback_matrix
template <typename T>
__global__ void feedback_matrix_kernel(T* __restrict__ out, int64_t rows, int64_t cols, uint32_t skey,
                                       Distribution dist, uint32_t threshold) {
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < rows;
       i += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const uint32_t rkey = row_key(skey, static_cast<uint32_t>(i));
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const uint32_t jj = static_cast<uint32_t>(j);
      out[i * cols + j] = static_cast<T>(value_from_keys(dist, rkey, col_key_for(dist, jj), jj, threshold));
    }
  }
}

template <typename T>
void launch_feedback_matrix(T* out, int64_t rows, int64_t cols, uint32_t skey, Distribution dist, uint32_t threshold,
                            cudaStream_t stream) {
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(cols, 32), 1024)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, 8), 65535)));
  launch_kernel(feedback_matrix_kernel<T>, grid, block, 0, stream, out, rows, cols, skey, dist, threshold);
}

}  // namespace
}  // namespace dfa_kernels
