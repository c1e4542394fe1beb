// project_points kernels and their launch sequence, without ATen (csrc/cuda/project_points.cu
// allocates and checks; the CUDA-on-CPU harness calls the same launch function):
//   out[l] = (scales[l] * (e @ B[:, offsets[l] : offsets[l] + widths[l]])) * f_l'(act_inputs[l]).
//
// The product runs once per column span, the union of the points' column ranges (plan_points): one
// span [0, D) in the independent layout, [0, max d_l) in the shared one, where every point reads a
// prefix of B. A block computes a [BM, 128] tile of the span with the SIMT GEMM tile of
// common.cuh, B generated from the hash (B = None) or read (fp32/fp16/bf16, independent of e's
// dtype), then runs the epilogue of every point whose columns meet the tile: the point's scale, the
// activation derivative of its pre-activation, the cast to out_dtype, the store into its own output.
// Points that share columns share the tile's product. The point descriptors travel in the kernel
// parameters (no host-to-device copy); more than kMaxPoints points in one span take one launch per
// kMaxPoints.
//
// Split-K (small N and span, long K), as in the virtual projection: gridDim.z slices of an fp32
// workspace [splits, N, span width]; a second kernel sums the slices in a fixed order and runs
// the points' epilogues.
#pragma once

#include <vector>

#include "dfa_kernels/activation.h"
#include "dfa_kernels/cuda/common.cuh"

namespace dfa_kernels {
// Internal linkage: each launcher (.cu, or harness) file that includes this header has its own
// copy of the kernels, as a .cu without relocatable device code must.
namespace {

struct PointDesc {
  void* out;          // [N, width], out_kind
  const void* act;    // [N, width] pre-activation in act_kind, or nullptr (activation "none")
  int64_t offset;     // first column of B
  int64_t width;
  float scale;
  Activation act_fn;
  FpKind act_kind;
};

struct PointsParams {
  PointDesc pts[kMaxPoints];
  int count;
  const void* e;        // [N, K] row-major
  const void* B;        // [K, ldb] row-major, or nullptr: generated
  float* partial;       // split-K workspace [gridDim.z, N, span_w], or nullptr
  int64_t N, K, ldb, span0, span_w, col_blocks, k_per_split;
  uint32_t skey, threshold;
  Distribution dist;
  FpKind e_kind, b_kind, out_kind;
};
static_assert(sizeof(PointsParams) <= 4096, "PointsParams must fit the 4 KiB kernel parameter space");

// scale * acc * f'(a[idx]): the reference's order of operations.
__device__ __forceinline__ float finish_point(float acc, const PointDesc& pt, int64_t idx) {
  float v = acc * pt.scale;
  if (pt.act != nullptr) v *= activation_grad(pt.act_fn, load_fp(pt.act, idx, pt.act_kind));
  return v;
}

// Point pt's part of values v[0 : n] at row r, columns j, ..., j + n - 1 of B: finished and stored
// (one 4-wide store when all four are the point's and aligned).
__device__ __forceinline__ void store_point(const PointDesc& pt, int64_t r, int64_t j, const float (&v)[4], int n,
                                            FpKind out_kind) {
  const int64_t c = j - pt.offset;  // the point's column of B column j
  const int64_t idx = r * pt.width + c;
  if (n == 4 && c >= 0 && c + 4 <= pt.width && pt.width % 4 == 0 && c % 4 == 0) {
    float w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) w[q] = finish_point(v[q], pt, idx + q);
    store4(pt.out, idx, w, 4, true, out_kind);
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (q < n && c + q >= 0 && c + q < pt.width) store_fp(pt.out, idx + q, finish_point(v[q], pt, idx + q), out_kind);
  }
}

template <int TM, bool kStoredB>
__global__ void __launch_bounds__(kSimtThreads, 2) project_points_kernel(const __grid_constant__ PointsParams p) {
  DFA_SHARED(SimtSmem<TM>, sm);
  const int64_t block = blockIdx.x;
  const int64_t row0 = (block / p.col_blocks) * SimtSmem<TM>::BM;
  const int64_t col0 = (block % p.col_blocks) * kSimtBN;  // within the span
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = std::min(p.K, k_begin + p.k_per_split);

  float acc[TM][8];
  if constexpr (kStoredB) {
    StoredB<32> bsrc{p.B, p.ldb, p.span0, p.b_kind};
    simt_gemm_tile<TM>(sm, p.e, p.e_kind, p.N, p.K, row0, col0, p.span_w, k_begin, k_end, bsrc, acc);
  } else {
    GeneratedB<32> bsrc{p.dist, p.skey, p.threshold, p.span0, {}};
    simt_gemm_tile<TM>(sm, p.e, p.e_kind, p.N, p.K, row0, col0, p.span_w, k_begin, k_end, bsrc, acc);
  }

  if (p.partial != nullptr) {
    const bool vec = (p.span_w % 4) == 0;  // 4-wide stores stay aligned
    float* partial = p.partial + static_cast<int64_t>(blockIdx.z) * p.N * p.span_w;
    simt_tile_epilogue<TM>(acc, row0, col0, p.N, p.span_w, [&](int64_t r, int64_t c, float (&v)[4], int n) {
      store4(partial, r * p.span_w + c, v, n, vec && n == 4, FpKind::F32);
    });
    return;
  }
  const int64_t first = p.span0 + col0, last = std::min(first + kSimtBN, p.span0 + p.span_w);
#pragma unroll 1
  for (int l = 0; l < p.count; ++l) {  // every point that reads some of the tile's columns (uniform)
    const PointDesc& pt = p.pts[l];
    if (pt.offset >= last || pt.offset + pt.width <= first) continue;
    simt_tile_epilogue<TM>(acc, row0, col0, p.N, p.span_w, [&](int64_t r, int64_t c, float (&v)[4], int n) {
      store_point(pt, r, p.span0 + c, v, n, p.out_kind);
    });
  }
}

// Split-K reduction and the points' epilogues: a grid-stride loop over the span's N * span_w entries.
__global__ void project_points_reduce_kernel(const __grid_constant__ PointsParams p, int splits) {
  const int64_t numel = p.N * p.span_w;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += p.partial[z * numel + idx];
    const int64_t r = idx / p.span_w, j = p.span0 + idx % p.span_w;
    for (int l = 0; l < p.count; ++l) {
      const PointDesc& pt = p.pts[l];
      if (j >= pt.offset && j < pt.offset + pt.width) {
        const int64_t out_idx = r * pt.width + (j - pt.offset);
        store_fp(pt.out, out_idx, finish_point(s, pt, out_idx), p.out_kind);
      }
    }
  }
}

// Every span and point chunk of the plan. p holds e, B, the spec and the kinds; points[l] is point l's
// descriptor; partials[s] is span s's workspace (plan.spans[s].split.splits * N * span width floats)
// when that span splits K.
inline void launch_points(const PointsPlan& plan, PointsParams p, const std::vector<PointDesc>& points,
                          const std::vector<float*>& partials, cudaStream_t stream) {
  for (size_t s = 0; s < plan.spans.size(); ++s) {
    const PointsSpanPlan& span = plan.spans[s];
    p.span0 = span.start;
    p.span_w = span.stop - span.start;
    p.col_blocks = span.col_blocks;
    p.k_per_split = span.split.k_per_split;
    p.partial = span.split.splits > 1 ? partials[s] : nullptr;
    const dim3 grid(static_cast<unsigned>(span.tiles), 1, static_cast<unsigned>(span.split.splits));
    for (size_t first = 0; first < span.members.size(); first += kMaxPoints) {
      p.count = static_cast<int>(std::min<size_t>(kMaxPoints, span.members.size() - first));
      for (int i = 0; i < p.count; ++i) p.pts[i] = points[span.members[first + i]];
      const bool stored = p.B != nullptr;
      switch (plan.tm) {
        case 1:
          launch_kernel(stored ? project_points_kernel<1, true> : project_points_kernel<1, false>, grid,
                        dim3(kSimtThreads), 0, stream, p);
          break;
        case 4:
          launch_kernel(stored ? project_points_kernel<4, true> : project_points_kernel<4, false>, grid,
                        dim3(kSimtThreads), 0, stream, p);
          break;
        default:
          launch_kernel(stored ? project_points_kernel<8, true> : project_points_kernel<8, false>, grid,
                        dim3(kSimtThreads), 0, stream, p);
          break;
      }
      if (span.split.splits > 1) {
        launch_kernel(project_points_reduce_kernel, dim3(static_cast<unsigned>(epilogue_blocks(p.N * p.span_w, 4096))),
                      dim3(kEpilogueThreads), 0, stream, p, static_cast<int>(span.split.splits));
      }
    }
  }
}

}  // namespace
}  // namespace dfa_kernels
