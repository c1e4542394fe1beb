// CUDA project_points: every feedback point's gradient in one launch per column span,
//   out[l] = (scales[l] * (e @ B[:, offsets[l] : offsets[l] + widths[l]])) * f_l'(act_inputs[l]).
//
// The product runs once per column span, the union of the points' column ranges (column_spans in
// checks.h): one span [0, D) in the independent layout, [0, max d_l) in the shared one, where every
// point reads a prefix of B. A block computes a [BM, 128] tile of the span with the SIMT GEMM tile of
// cuda_common.cuh, B generated from the hash (B = None) or read (fp32/fp16/bf16, independent of e's
// dtype), then runs the epilogue of every point whose columns meet the tile: the point's scale, the
// activation derivative of its pre-activation, the cast to out_dtype, the store into its own output.
// Points that share columns share the tile's product. The point descriptors travel in the kernel
// parameters (no host-to-device copy); more than kMaxPoints points in one span take one launch per
// kMaxPoints.
//
// Split-K (small N and span, long K), as in the virtual projection: gridDim.z slices of an fp32
// workspace [splits, N, span width]; a second kernel sums the slices in a fixed order and runs
// the points' epilogues.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dfa_kernels/activation.h"
#include "dfa_kernels/checks.h"
#include "dfa_kernels/cuda_common.cuh"
#include "dfa_kernels/hash.h"

namespace dfa_kernels {
namespace {

// Points per launch: their descriptors travel in the kernel parameters (64 x 40 B, under the
// 4 KiB parameter limit), so a launch needs no host-to-device copy.
constexpr int kMaxPoints = 64;

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
  __shared__ SimtSmem<TM> sm;
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

template <bool kStoredB>
void launch_points(const PointsParams& p, int tm, dim3 grid, cudaStream_t stream) {
  switch (tm) {
    case 1: project_points_kernel<1, kStoredB><<<grid, kSimtThreads, 0, stream>>>(p); break;
    case 4: project_points_kernel<4, kStoredB><<<grid, kSimtThreads, 0, stream>>>(p); break;
    default: project_points_kernel<8, kStoredB><<<grid, kSimtThreads, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> project_points_cuda(const at::Tensor& e, const std::optional<at::Tensor>& B, int64_t seed,
                                            c10::string_view distribution, double density,
                                            at::IntArrayRef offsets, at::IntArrayRef widths,
                                            at::ArrayRef<double> scales,
                                            const c10::List<std::optional<at::Tensor>>& act_inputs,
                                            const std::vector<std::string>& activations,
                                            std::optional<at::ScalarType> out_dtype) {
  const FeedbackSpec spec = parse_feedback_spec(seed, distribution, density);
  at::ScalarType out_type;
  const std::vector<PointArgs> points =
      check_project_points_args(e, B, offsets, widths, scales, act_inputs, activations, out_dtype, &out_type);
  const c10::cuda::CUDAGuard guard(e.device());
  const int64_t N = e.size(0), K = e.size(1);
  std::vector<at::Tensor> outs;
  outs.reserve(points.size());
  for (const PointArgs& pa : points) {
    outs.push_back(K == 0 ? at::zeros({N, pa.width}, e.options().dtype(out_type))
                          : at::empty({N, pa.width}, e.options().dtype(out_type)));
  }
  if (N == 0 || K == 0) return outs;

  PointsParams p{};
  p.e = e.const_data_ptr();
  p.N = N;
  p.K = K;
  p.skey = seed_key(spec.seed);
  p.threshold = spec.threshold;
  p.dist = spec.dist;
  p.e_kind = fp_kind(e.scalar_type());
  p.out_kind = fp_kind(out_type);
  at::Tensor B_read;  // B in a dtype the kernel reads, row-major
  if (B.has_value()) {
    B_read = is_supported_activation_dtype(B->scalar_type()) ? B->contiguous() : B->to(at::kFloat).contiguous();
    p.B = B_read.const_data_ptr();
    p.ldb = B_read.size(1);
    p.b_kind = fp_kind(B_read.scalar_type());
  }

  const int tm = simt_tm(N);
  const int64_t row_blocks = ceil_div(N, 16 * tm);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& [start, stop] : column_spans(points)) {
    std::vector<size_t> members;  // the points inside this span
    for (size_t l = 0; l < points.size(); ++l) {
      if (points[l].width > 0 && points[l].offset >= start && points[l].offset + points[l].width <= stop) {
        members.push_back(l);
      }
    }
    p.span0 = start;
    p.span_w = stop - start;
    p.col_blocks = ceil_div(p.span_w, kSimtBN);
    const int64_t tiles = row_blocks * p.col_blocks;
    TORCH_CHECK(tiles <= INT32_MAX, "project_points: output too large for one launch (", tiles, " tiles)");
    int64_t splits = 1;
    p.k_per_split = plan_split_k(tiles, K, sms, &splits);
    at::Tensor partial;
    p.partial = nullptr;
    if (splits > 1) {
      partial = at::empty({splits, N, p.span_w}, e.options().dtype(at::kFloat));
      p.partial = partial.data_ptr<float>();
    }
    for (size_t first = 0; first < members.size(); first += kMaxPoints) {
      p.count = static_cast<int>(std::min<size_t>(kMaxPoints, members.size() - first));
      for (int i = 0; i < p.count; ++i) {
        const size_t l = members[first + i];
        const PointArgs& pa = points[l];
        PointDesc& d = p.pts[i];
        d.out = outs[l].data_ptr();
        d.act = pa.act_input.defined() ? pa.act_input.const_data_ptr() : nullptr;
        d.act_kind = pa.act_input.defined() ? fp_kind(pa.act_input.scalar_type()) : FpKind::F32;
        d.act_fn = pa.act;
        d.offset = pa.offset;
        d.width = pa.width;
        d.scale = pa.scale;
      }
      const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
      if (B.has_value()) {
        launch_points<true>(p, tm, grid, stream);
      } else {
        launch_points<false>(p, tm, grid, stream);
      }
      if (splits > 1) {
        const dim3 rgrid(static_cast<unsigned>(std::min<int64_t>(ceil_div(N * p.span_w, 256), 4096)));
        project_points_reduce_kernel<<<rgrid, 256, 0, stream>>>(p, static_cast<int>(splits));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
  return outs;
}

}  // namespace
}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CUDA, m) {
  m.impl("project_points", &dfa_kernels::project_points_cuda);
}
