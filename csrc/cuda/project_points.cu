// CUDA project_points: every feedback point's gradient in one launch,
//   out[l] = (scales[l] * (e @ B[:, offsets[l] : offsets[l] + widths[l]])) * f_l'(act_inputs[l]).
//
// A grouped SIMT GEMM (the tile of cuda_common.cuh): blockIdx.x enumerates the tiles of every point
// in turn, point l owning blocks [tile_begin_l, tile_begin_l + row_blocks * col_blocks_l); a block
// finds its point by a scan of the (at most kMaxPoints) tile_begin values in the kernel
// parameters, then computes a [BM, 128] tile of that point with B's columns shifted by the point's
// offset, either generated from the hash (B = None) or read from B (fp32/fp16/bf16, any of them
// independent of e's dtype). The epilogue multiplies by the scale and the activation derivative of
// the point's pre-activation, and stores in out_dtype. All points share N and so the row tile
// height. More than kMaxPoints points take one launch per kMaxPoints.
//
// Split-K (small N and widths, long K), as in the virtual projection: gridDim.z slices of an fp32
// workspace, point l at part_base_l of each slice; a second grouped kernel (blockIdx.y = point)
// sums the slices in a fixed order and applies the epilogue.
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

// Points per launch: their descriptors travel in the kernel parameters (32 x 72 B, under the
// 4 KiB parameter limit), so a launch needs no host-to-device copy.
constexpr int kMaxPoints = 32;

struct PointDesc {
  void* out;           // [N, width], out_kind
  const void* act;     // [N, width] pre-activation in act_kind, or nullptr (activation "none")
  int64_t offset;      // first column of B
  int64_t width;
  int64_t tile_begin;  // first blockIdx.x of this point
  int64_t col_blocks;
  int64_t part_base;   // split-K: offset of this point's [N, width] block in a workspace slice
  float scale;
  Activation act_fn;
  FpKind act_kind;
};

struct PointsParams {
  PointDesc pts[kMaxPoints];
  int count;
  const void* e;        // [N, K] row-major
  const void* B;        // [K, ldb] row-major, or nullptr: generated
  float* partial;       // split-K workspace [gridDim.z, part_stride], or nullptr
  int64_t N, K, ldb, part_stride, k_per_split;
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

template <int TM, bool kStoredB>
__global__ void __launch_bounds__(kSimtThreads, 2) project_points_kernel(const __grid_constant__ PointsParams p) {
  __shared__ SimtSmem<TM> sm;
  const int64_t block = blockIdx.x;
  int l = 0;
  while (l + 1 < p.count && block >= p.pts[l + 1].tile_begin) ++l;  // uniform over the block
  const PointDesc& pt = p.pts[l];
  const int64_t local = block - pt.tile_begin;
  const int64_t row0 = (local / pt.col_blocks) * SimtSmem<TM>::BM;
  const int64_t col0 = (local % pt.col_blocks) * kSimtBN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
  const int64_t k_end = std::min(p.K, k_begin + p.k_per_split);

  float acc[TM][8];
  if constexpr (kStoredB) {
    StoredB<32> bsrc{p.B, p.ldb, pt.offset, p.b_kind};
    simt_gemm_tile<TM>(sm, p.e, p.e_kind, p.N, p.K, row0, col0, pt.width, k_begin, k_end, bsrc, acc);
  } else {
    GeneratedB<32> bsrc{p.dist, p.skey, p.threshold, pt.offset, {}};
    simt_gemm_tile<TM>(sm, p.e, p.e_kind, p.N, p.K, row0, col0, pt.width, k_begin, k_end, bsrc, acc);
  }

  // 4-wide stores stay aligned when the width is (part_base and part_stride are multiples of 4).
  const bool vec = (pt.width % 4) == 0;
  if (p.partial != nullptr) {
    float* partial = p.partial + static_cast<int64_t>(blockIdx.z) * p.part_stride + pt.part_base;
    simt_tile_epilogue<TM>(acc, row0, col0, p.N, pt.width, [&](int64_t r, int64_t c, float (&v)[4], int n) {
      store4(partial, r * pt.width + c, v, n, vec && n == 4, FpKind::F32);
    });
  } else {
    simt_tile_epilogue<TM>(acc, row0, col0, p.N, pt.width, [&](int64_t r, int64_t c, float (&v)[4], int n) {
      const int64_t idx = r * pt.width + c;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q < n) v[q] = finish_point(v[q], pt, idx + q);
      }
      store4(pt.out, idx, v, n, vec && n == 4, p.out_kind);
    });
  }
}

// Split-K reduction and epilogue: blockIdx.y = point, a grid-stride loop over its N * width entries.
__global__ void project_points_reduce_kernel(const __grid_constant__ PointsParams p, int splits) {
  const PointDesc& pt = p.pts[blockIdx.y];
  const int64_t numel = p.N * pt.width;
  const float* src = p.partial + pt.part_base;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < numel;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < splits; ++z) s += src[z * p.part_stride + idx];
    store_fp(pt.out, idx, finish_point(s, pt, idx), p.out_kind);
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
  std::vector<size_t> chunk;  // indices of the points of one launch
  for (size_t next = 0; next < points.size();) {
    chunk.clear();
    for (; next < points.size() && chunk.size() < static_cast<size_t>(kMaxPoints); ++next) {
      if (points[next].width > 0) chunk.push_back(next);
    }
    if (chunk.empty()) continue;
    p.count = static_cast<int>(chunk.size());
    int64_t tiles = 0, part = 0;
    for (int i = 0; i < p.count; ++i) {
      const PointArgs& pa = points[chunk[i]];
      PointDesc& d = p.pts[i];
      d.out = outs[chunk[i]].data_ptr();
      d.act = pa.act_input.defined() ? pa.act_input.const_data_ptr() : nullptr;
      d.act_kind = pa.act_input.defined() ? fp_kind(pa.act_input.scalar_type()) : FpKind::F32;
      d.act_fn = pa.act;
      d.offset = pa.offset;
      d.width = pa.width;
      d.scale = pa.scale;
      d.col_blocks = ceil_div(pa.width, kSimtBN);
      d.tile_begin = tiles;
      tiles += row_blocks * d.col_blocks;
      d.part_base = part;
      part += ceil_div(N * pa.width, 4) * 4;  // keeps every block 16-byte aligned
    }
    TORCH_CHECK(tiles <= INT32_MAX, "project_points: output too large for one launch (", tiles, " tiles)");
    int64_t splits = 1;
    p.k_per_split = plan_split_k(tiles, K, sms, &splits);
    at::Tensor partial;
    p.partial = nullptr;
    if (splits > 1) {
      partial = at::empty({splits * part}, e.options().dtype(at::kFloat));
      p.partial = partial.data_ptr<float>();
      p.part_stride = part;
    }
    const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(splits));
    if (B.has_value()) {
      launch_points<true>(p, tm, grid, stream);
    } else {
      launch_points<false>(p, tm, grid, stream);
    }
    if (splits > 1) {
      int64_t most = 0;
      for (int i = 0; i < p.count; ++i) most = std::max(most, N * p.pts[i].width);
      const dim3 rgrid(static_cast<unsigned>(std::min<int64_t>(ceil_div(most, 256), 4096)),
                       static_cast<unsigned>(p.count));
      project_points_reduce_kernel<<<rgrid, 256, 0, stream>>>(p, static_cast<int>(splits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return outs;
}

}  // namespace
}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CUDA, m) {
  m.impl("project_points", &dfa_kernels::project_points_cuda);
}
