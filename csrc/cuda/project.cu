// CUDA implementations: the virtual projection (B generated tile by tile in shared memory, never
// stored), the materialized projection (cuBLAS + epilogue) and feedback_matrix.
//
// Virtual projection: a tiled SIMT GEMM F[N, W] = e[N, K] @ B[K, W], fp32 accumulate.
//   * A 256-thread block computes a [BM, 128] tile of F, BM = 16 * TM (TM = 1, 4 or 8 by N, so a
//     small N does not pay for 128-row tiles). Thread (tx, ty) = (tid % 16, tid / 16) owns rows
//     ty * TM + [0, TM) and columns tx * 4 + [0, 4) and 64 + tx * 4 + [0, 4): float4 shared reads
//     of B are conflict-free and float4 stores of F are coalesced.
//   * Each K step (BK = 8 rows of B) a thread generates 4 entries of the B tile in one row: one
//     row key per step, and the 4 column keys stay in registers for the whole block, so an entry
//     costs one mix32. The e tile is converted to fp32 on load (fp32/fp16/bf16 inputs).
//   * Double-buffered shared tiles: the next e tile is fetched into registers before the FMAs of
//     the current one, and the next B tile is generated after them; one barrier per step.
//   * When the tile grid cannot fill the GPU (small N and width), K is split over gridDim.z into
//     an fp32 workspace [splits, N, W] that a second kernel sums in a fixed order (deterministic).
//   * Epilogue: (acc * scale) * col_scale[j], cast to the output dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>

#include "dfa_kernels/checks.h"
#include "dfa_kernels/hash.h"
#include "dfa_kernels/ops.h"

namespace dfa_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kBN = 128;
constexpr int kBK = 8;
constexpr int kPadA = 4;  // keeps the transposed e-tile stores conflict-free and rows 16-byte aligned
constexpr int kMaxSplits = 64;
constexpr int64_t kMinKTilesPerSplit = 32;  // each split covers >= 256 rows of B

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Activation/output dtypes are a runtime switch, not a template parameter: the branch is uniform
// and costs little next to the FMAs, while each instantiation of the GEMM kernel costs minutes of
// compile time.
enum class FpKind : int { F32 = 0, F16 = 1, BF16 = 2 };

FpKind fp_kind(at::ScalarType t) {
  return t == at::kFloat ? FpKind::F32 : (t == at::kHalf ? FpKind::F16 : FpKind::BF16);
}

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

struct ProjectParams {
  const void* e;           // [N, K] row-major, in_kind
  void* out;               // [N, W] out dtype; written when partial == nullptr
  float* partial;          // split-K: [gridDim.z, N, W] raw fp32 sums, else nullptr
  const float* col_scale;  // [W] or nullptr
  int64_t N, K, W;
  int64_t k_per_split;     // multiple of kBK
  int64_t col_blocks;
  float scale;
  uint32_t skey, threshold;
  Distribution dist;
  FpKind in_kind, out_kind;
};

template <int TM>
__global__ void __launch_bounds__(kThreads, 2) project_virtual_kernel(const ProjectParams p) {
  constexpr int BM = 16 * TM;
  constexpr int kALoads = (BM * kBK + kThreads - 1) / kThreads;  // e-tile elements per thread
  __shared__ __align__(16) float As[2][kBK][BM + kPadA];  // e tile, transposed: [k][row]
  __shared__ __align__(16) float Bs[2][kBK][kBN];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  // Consecutive blocks share a row block, so its e tiles are reused from L2.
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.col_blocks) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x % p.col_blocks) * kBN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = std::min(p.K, k_begin + p.k_per_split);
  const int64_t num_tiles = ceil_div(k_end - k_begin, kBK);

  // B-tile generation: this thread writes row tid / 32 of the tile, columns j0 + 32 q; only the
  // column keys live in registers (j and its bound check are recomputed, to save registers).
  const int b_row = tid / 32;
  const int64_t j0 = col0 + tid % 32;
  uint32_t ckey[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) ckey[q] = col_key_for(p.dist, static_cast<uint32_t>(j0 + 32 * q));
  auto generate_b = [&](int buf, int64_t k0) {
    const int64_t k = k0 + b_row;
    const uint32_t rkey = row_key(p.skey, static_cast<uint32_t>(k));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + 32 * q;
      float v = 0.0f;
      if (k < k_end && j < p.W) {
        v = value_from_keys(p.dist, rkey, ckey[q], static_cast<uint32_t>(j), p.threshold);
      }
      Bs[buf][b_row][tid % 32 + 32 * q] = v;
    }
  };

  // e-tile loads: element idx = tid + l * kThreads is (row idx / kBK, k idx % kBK), so a warp
  // reads 4 rows x 8 consecutive k.
  float a_reg[kALoads];
  auto load_a = [&](int64_t k0) {
#pragma unroll
    for (int l = 0; l < kALoads; ++l) {
      const int idx = tid + l * kThreads;
      const int64_t r = row0 + idx / kBK;
      const int64_t k = k0 + idx % kBK;
      a_reg[l] = (idx < BM * kBK && r < p.N && k < k_end) ? load_fp(p.e, r * p.K + k, p.in_kind) : 0.0f;
    }
  };
  auto store_a = [&](int buf) {
#pragma unroll
    for (int l = 0; l < kALoads; ++l) {
      const int idx = tid + l * kThreads;
      if (idx < BM * kBK) As[buf][idx % kBK][idx / kBK] = a_reg[l];
    }
  };

  float acc[TM][8];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  if (num_tiles > 0) {
    load_a(k_begin);
    store_a(0);
    generate_b(0, k_begin);
    __syncthreads();
  }
  for (int64_t t = 0; t < num_tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    const bool has_next = t + 1 < num_tiles;
    const int64_t k_next = k_begin + (t + 1) * kBK;
    if (has_next) load_a(k_next);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[TM];
      if constexpr (TM % 4 == 0) {
#pragma unroll
        for (int i = 0; i < TM; i += 4) {
          const float4 v = *reinterpret_cast<const float4*>(&As[cur][kk][ty * TM + i]);
          a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = As[cur][kk][ty * TM + i];
      }
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 + tx * 4]);
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    if (has_next) {
      // The other buffer was last read before the previous barrier, so it is free.
      store_a(cur ^ 1);
      generate_b(cur ^ 1, k_next);
    }
    __syncthreads();
  }

  // Epilogue. Loops are fully unrolled with guards (no early exits) so acc stays in registers.
  const bool vec4 = (p.W % 4) == 0;  // float4 stores stay aligned
  float* partial = p.partial != nullptr ? p.partial + static_cast<int64_t>(blockIdx.z) * p.N * p.W : nullptr;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t r = row0 + ty * TM + i;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = col0 + h * 64 + tx * 4;
      if (r >= p.N || c >= p.W) continue;
      const int64_t base = r * p.W + c;
      const bool full = vec4 && c + 4 <= p.W;
      float v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = acc[i][4 * h + q];
      if (partial == nullptr) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          v[q] *= p.scale;
          if (p.col_scale != nullptr && c + q < p.W) v[q] *= p.col_scale[c + q];
        }
      }
      // fp32 destination (split-K partial or fp32 output): float4 stores when aligned.
      float* dst32 = partial != nullptr ? partial
                                        : (p.out_kind == FpKind::F32 ? static_cast<float*>(p.out) : nullptr);
      if (dst32 != nullptr && full) {
        *reinterpret_cast<float4*>(dst32 + base) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (c + q >= p.W) break;
          if (dst32 != nullptr) {
            dst32[base + q] = v[q];
          } else {
            store_fp(p.out, base + q, v[q], p.out_kind);
          }
        }
      }
    }
  }
}

// out = cast((sum_z partial[z] * scale) * col_scale): the split-K reduction (fixed order) and the
// epilogue of the materialized projection (splits = 1, where out may alias partial).
__global__ void epilogue_kernel(const float* partial, int splits, int64_t numel, int64_t W,
                                float scale, const float* __restrict__ col_scale, void* out,
                                FpKind kind) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += partial[z * numel + idx];
    float v = s * scale;
    if (col_scale != nullptr) v *= col_scale[idx % W];
    store_fp(out, idx, v, kind);
  }
}

void launch_epilogue(const at::Tensor& partial, int splits, const at::Tensor& out, float scale,
                     const float* col_scale, cudaStream_t stream) {
  const int64_t numel = out.numel();
  const int64_t blocks = std::min<int64_t>(ceil_div(numel, 256), 65536);
  epilogue_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      partial.const_data_ptr<float>(), splits, numel, out.size(1), scale, col_scale,
      out.data_ptr(), fp_kind(out.scalar_type()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_project(const ProjectParams& p, int tm, dim3 grid, cudaStream_t stream) {
  switch (tm) {
    case 1: project_virtual_kernel<1><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: project_virtual_kernel<4><<<grid, kThreads, 0, stream>>>(p); break;
    default: project_virtual_kernel<8><<<grid, kThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  ProjectParams p{};
  p.e = e.const_data_ptr();
  p.out = out.data_ptr();
  p.col_scale = col_scale_ptr(col_scale, cs_holder);
  p.N = N;
  p.K = K;
  p.W = W;
  p.scale = static_cast<float>(scale);
  p.skey = seed_key(spec.seed);
  p.threshold = spec.threshold;
  p.dist = spec.dist;
  p.in_kind = fp_kind(e.scalar_type());
  p.out_kind = fp_kind(out_type);

  const int tm = N <= 16 ? 1 : (N <= 64 ? 4 : 8);
  p.col_blocks = ceil_div(W, kBN);
  const int64_t tiles = ceil_div(N, 16 * tm) * p.col_blocks;
  TORCH_CHECK(tiles <= INT32_MAX, "project: output too large for one launch (", N, " x ", W, ")");
  // Split K when the tiles alone leave SMs idle (small N and width, long K).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t k_tiles = ceil_div(K, kBK);
  int64_t splits = 1;
  if (tiles < sms) {
    splits = std::max<int64_t>(
        1, std::min<int64_t>({ceil_div(2 * sms, tiles), k_tiles / kMinKTilesPerSplit, kMaxSplits}));
  }
  p.k_per_split = ceil_div(k_tiles, splits) * kBK;
  splits = ceil_div(K, p.k_per_split);  // every split non-empty
  at::Tensor partial;
  if (splits > 1) {
    partial = at::empty({splits, N, W}, e.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
  launch_project(p, tm, grid, stream);
  if (splits > 1) launch_epilogue(partial, static_cast<int>(splits), out, p.scale, p.col_scale, stream);
  return out;
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

  const at::Tensor acc = at::mm(e.to(at::kFloat), B.to(at::kFloat));  // cuBLAS, fp32
  if (out_type == at::kFloat && scale == 1.0 && !col_scale.has_value()) return acc;
  at::Tensor out = out_type == at::kFloat ? acc : at::empty({N, W}, e.options().dtype(out_type));
  at::Tensor cs_holder;
  launch_epilogue(acc, 1, out, static_cast<float>(scale), col_scale_ptr(col_scale, cs_holder),
                  at::cuda::getCurrentCUDAStream());
  return out;
}

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

}  // namespace

at::Tensor feedback_matrix_cuda(const FeedbackSpec& spec, int64_t rows, int64_t cols, at::ScalarType dtype,
                                at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(dtype).device(device));
  if (out.numel() == 0) return out;
  const dim3 block(32, 8);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(cols, 32), 1024)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, 8), 65535)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "feedback_matrix_cuda", [&] {
    feedback_matrix_kernel<scalar_t><<<grid, block, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), rows, cols, seed_key(spec.seed), spec.dist, spec.threshold);
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
