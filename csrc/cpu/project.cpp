// CPU implementations: the virtual projection (B generated block by block, never stored), the
// materialized projection, the per-point projection with the fused activation-derivative epilogue
// (project_points) and feedback_matrix.
//
// Virtual projection: the output F [N, W] is split into column blocks (and, when there are fewer
// column blocks than threads, row blocks); at::parallel_for runs one task per block. A task walks
// out_features in chunks of bk rows, generates the B block [bk, bn] into a thread-local buffer
// (256 KiB, cache-resident) and accumulates F_block += e[:, chunk] @ B_block with a BLAS call, then
// applies col_scale and the output cast to its block while it is still in cache. When B's block is
// a single chunk (out_features <= bk), the rows go in L2-sized chunks instead, each finished before
// the next, and a narrow e (out_features <= 16) multiplies by a register-tiled outer product
// rather than BLAS. The materialized projection takes the same path when B's block is a single
// chunk, with B's blocks read in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "dfa_kernels/activation.h"
#include "dfa_kernels/checks.h"
#include "dfa_kernels/cpu_isa.h"
#include "dfa_kernels/hash.h"
#include "dfa_kernels/ops.h"

// Each hand-tiled or vectorizable loop is an inline body compiled once per instruction-set path
// (cpu_isa.h) by a small wrapper with that path's target attribute; for_isa picks the wrapper of the
// process's path. (target_clones would pick by itself, but could not be forced to another path.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DFA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define DFA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DFA_TARGET_AVX512
#define DFA_TARGET_AVX2
#endif
#define DFA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace dfa_kernels {
namespace {

constexpr int64_t kBlockEntries = 256 * 256;  // B block size: 256 KiB of fp32
constexpr int64_t kMaxBlockCols = 256;
constexpr int64_t kMinBlockCols = 32;  // multiple of 32: rademacher blocks start on a hash word
constexpr int64_t kMinBlockRows = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The wrapper of the process's instruction-set path.
template <class F>
F for_isa(F baseline, F avx2, F avx512) {
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return avx512;
    case CpuIsa::Avx2: return avx2;
    default: return baseline;
  }
}

// Column keys for columns [j0, j0 + cols): one per column, or for rademacher one per 32-column
// hash word, starting with the word of column j0.
void column_keys(Distribution dist, int64_t j0, int64_t cols, std::vector<uint32_t>& keys) {
  keys.clear();
  if (dist == Distribution::Rademacher) {
    for (int64_t w = j0 >> 5; w <= (j0 + cols - 1) >> 5; ++w) {
      keys.push_back(col_key(static_cast<uint32_t>(w)));
    }
  } else {
    for (int64_t j = j0; j < j0 + cols; ++j) keys.push_back(col_key(static_cast<uint32_t>(j)));
  }
}

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Gaussian entries without libm calls, so the generator loop vectorizes (about 10x faster than
// gaussian_value's logf/cosf). Same formula and fp32 inputs as hash.h; the log and cos below are
// within 2.1e-7 (relative) and 7.8e-8 (absolute) of the exact functions over all 2^24 inputs each,
// so entries stay within 2% of hash.h's gaussian tolerance of the libm version. Selects are done
// on integers: a conditional float operation would block vectorization under -ftrapping-math.
//
// ln(u) for normal u > 0: u = m 2^e with m in [sqrt(1/2), sqrt(2)), ln(m) = 2 atanh((m-1)/(m+1)).
inline float log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;   // m in [1, 2)
  const uint32_t halve = mbits > 0x3fb504f3u ? 1u : 0u;  // m > sqrt(2): use m / 2
  mbits -= halve << 23;
  const int32_t e = static_cast<int32_t>(bits >> 23) - 127 + static_cast<int32_t>(halve);
  const float f = bits_to_float(mbits) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float atanh_s = s * (1.0f + z * (0.33333334f + z * (0.2f + z * (0.14285715f + z * 0.11111111f))));
  return static_cast<float>(e) * 0.693147182f + 2.0f * atanh_s;
}

// cos(x) for 0 <= x < 8: x = q pi/2 + r with |r| <= pi/4 (pi/2 in three parts), Cephes polynomials.
inline float cos_small(float x) {
  const int32_t q = static_cast<int32_t>(x * 0.636619772f + 0.5f);
  const float qf = static_cast<float>(q);
  float r = x - qf * 1.5703125f;
  r -= qf * 4.83751296997e-4f;
  r -= qf * 7.54978995489e-8f;
  const float z = r * r;
  const float cos_r =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  const float sin_r = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  // cos(r + q pi/2) = cos r, -sin r, -cos r, sin r for q mod 4 = 0, 1, 2, 3.
  const uint32_t odd = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t v = (float_to_bits(cos_r) & ~odd) | (float_to_bits(sin_r) & odd);
  return bits_to_float(v ^ ((static_cast<uint32_t>(q + 1) & 2u) << 30));
}

inline float gaussian_value_cpu(uint32_t h) {
  const float u1 = static_cast<float>((h >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float u2 = static_cast<float>(mix32(h ^ 0x68e31da4u) >> 8) * 5.9604644775390625e-08f;
  return std::sqrt(-2.0f * log_unit(u1)) * cos_small(6.283185307179586f * u2);
}

// dst[c] = B[i, j0 + c] for c < cols, given rkey = row_key(seed_key, i) and the column keys above.
DFA_ALWAYS_INLINE void generate_row_body(const FeedbackSpec& spec, uint32_t rkey, int64_t j0, int64_t cols,
                                   const uint32_t* ckeys, float* dst) {
  switch (spec.dist) {
    case Distribution::Uniform:
      for (int64_t c = 0; c < cols; ++c) dst[c] = uniform_value(hash_from_keys(rkey, ckeys[c]));
      break;
    case Distribution::Sparse:
      for (int64_t c = 0; c < cols; ++c)
        dst[c] = sparse_value(hash_from_keys(rkey, ckeys[c]), spec.threshold);
      break;
    case Distribution::Gaussian:
      for (int64_t c = 0; c < cols; ++c) dst[c] = gaussian_value_cpu(hash_from_keys(rkey, ckeys[c]));
      break;
    case Distribution::Rademacher: {
      // One hash word gives 32 entries: bit (j & 31) of word j >> 5. The arithmetic form of
      // rademacher_value (+-1 from the bit) vectorizes better than a select.
      int64_t c = 0;
      for (int64_t w = 0; c < cols; ++w) {
        const uint32_t h = hash_from_keys(rkey, ckeys[w]);
        const int64_t bit0 = (j0 + c) & 31;
        const int64_t n = std::min<int64_t>(32 - bit0, cols - c);
        for (int64_t b = 0; b < n; ++b)
          dst[c + b] = static_cast<float>(static_cast<int32_t>((h >> (bit0 + b)) & 1u) * 2 - 1);
        c += n;
      }
      break;
    }
  }
}

using GenerateRow = void (*)(const FeedbackSpec&, uint32_t, int64_t, int64_t, const uint32_t*, float*);
DFA_TARGET_AVX512 void generate_row_avx512(const FeedbackSpec& spec, uint32_t rkey, int64_t j0, int64_t cols,
                                           const uint32_t* ckeys, float* dst) {
  generate_row_body(spec, rkey, j0, cols, ckeys, dst);
}
DFA_TARGET_AVX2 void generate_row_avx2(const FeedbackSpec& spec, uint32_t rkey, int64_t j0, int64_t cols,
                                       const uint32_t* ckeys, float* dst) {
  generate_row_body(spec, rkey, j0, cols, ckeys, dst);
}
void generate_row_baseline(const FeedbackSpec& spec, uint32_t rkey, int64_t j0, int64_t cols, const uint32_t* ckeys,
                           float* dst) {
  generate_row_body(spec, rkey, j0, cols, ckeys, dst);
}
GenerateRow generate_row_fn() { return for_isa<GenerateRow>(generate_row_baseline, generate_row_avx2, generate_row_avx512); }

// out[r, c] = cast((acc[r, c] * scale) * col_scale[c]) for an [rows, cols] block; both pointers
// point at the block's first element of [*, ld] row-major matrices. acc and out may alias.
template <typename OutT>
DFA_ALWAYS_INLINE void epilogue_block_body(const float* acc, OutT* out, int64_t ld, int64_t rows, int64_t cols, float scale,
                    const float* col_scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = acc + r * ld;
    OutT* o = out + r * ld;
    if (col_scale != nullptr) {
      for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<OutT>((a[c] * scale) * col_scale[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) o[c] = static_cast<OutT>(a[c] * scale);
    }
  }
}

template <typename OutT>
using EpilogueBlock = void (*)(const float*, OutT*, int64_t, int64_t, int64_t, float, const float*);
template <typename OutT>
DFA_TARGET_AVX512 void epilogue_block_avx512(const float* acc, OutT* out, int64_t ld, int64_t rows, int64_t cols,
                                             float scale, const float* col_scale) {
  epilogue_block_body(acc, out, ld, rows, cols, scale, col_scale);
}
template <typename OutT>
DFA_TARGET_AVX2 void epilogue_block_avx2(const float* acc, OutT* out, int64_t ld, int64_t rows, int64_t cols,
                                         float scale, const float* col_scale) {
  epilogue_block_body(acc, out, ld, rows, cols, scale, col_scale);
}
template <typename OutT>
void epilogue_block_baseline(const float* acc, OutT* out, int64_t ld, int64_t rows, int64_t cols, float scale,
                             const float* col_scale) {
  epilogue_block_body(acc, out, ld, rows, cols, scale, col_scale);
}
template <typename OutT>
void epilogue_block(const float* acc, OutT* out, int64_t ld, int64_t rows, int64_t cols, float scale,
                    const float* col_scale) {
  for_isa<EpilogueBlock<OutT>>(epilogue_block_baseline<OutT>, epilogue_block_avx2<OutT>,
                               epilogue_block_avx512<OutT>)(acc, out, ld, rows, cols, scale, col_scale);
}

// Applies the epilogue to the block [r0, r0 + rows) x [j0, j0 + cols) of the fp32 accumulator,
// writing into `out` (which may be `acc` itself when the output is fp32).
void finish_block(const at::Tensor& acc, const at::Tensor& out, int64_t r0, int64_t rows, int64_t j0,
                  int64_t cols, float scale, const float* col_scale) {
  if (out.scalar_type() == at::kFloat && scale == 1.0f && col_scale == nullptr &&
      out.is_same(acc)) {
    return;
  }
  const int64_t ld = acc.size(1);
  const float* a = acc.const_data_ptr<float>() + r0 * ld + j0;
  const float* cs = col_scale != nullptr ? col_scale + j0 : nullptr;
  const int64_t offset = r0 * ld + j0;
  switch (out.scalar_type()) {  // the dtypes check_project_args allows
    case at::kFloat:
      epilogue_block(a, out.mutable_data_ptr<float>() + offset, ld, rows, cols, scale, cs);
      break;
    case at::kHalf:
      epilogue_block(a, out.mutable_data_ptr<at::Half>() + offset, ld, rows, cols, scale, cs);
      break;
    default:
      epilogue_block(a, out.mutable_data_ptr<at::BFloat16>() + offset, ld, rows, cols, scale, cs);
      break;
  }
}

const float* col_scale_ptr(const std::optional<at::Tensor>& col_scale, at::Tensor& holder) {
  if (!col_scale.has_value()) return nullptr;
  holder = col_scale->contiguous();
  return holder.const_data_ptr<float>();
}

// Block shapes for the virtual projection.
struct Plan {
  int64_t bn, bk;                       // B block: bk rows (out_features) x bn columns
  int64_t col_blocks, row_blocks, rows_per_block;
  bool whole_rows;                      // narrow: every task writes whole rows with all of B
};

// A narrow e (out_features <= kNarrowK) whose whole B fits in L2 next to a chunk of the output:
// tasks take whole rows (contiguous output per thread: the hardware's write combining and page
// faults stay local; strips of 256 columns wrote 25-50% slower, measured at 2 threads), B is
// generated once per call.
constexpr int64_t kNarrowK = 16;
constexpr int64_t kWholeRowsMaxBBytes = 512 * 1024;
constexpr int64_t kWholeRowsMinRows = 8;

Plan plan_blocks(int64_t N, int64_t K, int64_t W) {
  const int64_t threads = at::get_num_threads();
  Plan p{};
  if (K <= kNarrowK && K * W * static_cast<int64_t>(sizeof(float)) <= kWholeRowsMaxBBytes) {
    p.whole_rows = true;
    p.bn = W;
    p.bk = K;
    p.col_blocks = 1;
    p.row_blocks = std::max<int64_t>(1, std::min(4 * threads, N / kWholeRowsMinRows));  // 4 per thread: balance
    p.rows_per_block = ceil_div(N, p.row_blocks);
    p.row_blocks = ceil_div(N, p.rows_per_block);
    return p;
  }
  // Narrow the column blocks until every thread has one (down to 32 columns).
  p.bn = kMaxBlockCols;
  while (p.bn > kMinBlockCols && ceil_div(W, p.bn) < threads) p.bn /= 2;
  p.bn = std::min(p.bn, W);
  p.col_blocks = ceil_div(W, p.bn);
  // Still too few: split the rows too; each row block regenerates its B blocks, which is cheap
  // next to a GEMM with at least kMinBlockRows rows.
  p.row_blocks = 1;
  if (p.col_blocks < threads) {
    p.row_blocks = std::max<int64_t>(
        1, std::min(ceil_div(threads, p.col_blocks), N / kMinBlockRows));
  }
  p.rows_per_block = ceil_div(N, p.row_blocks);
  p.row_blocks = ceil_div(N, p.rows_per_block);
  p.bk = std::min(K, kBlockEntries / p.bn);
  return p;
}

// B [K, cols] from column j0 on, generated once (the whole-rows plan's B), threaded over rows of B.
at::Tensor generate_block(const FeedbackSpec& spec, int64_t K, int64_t j0, int64_t cols) {
  at::Tensor B = at::empty({K, cols}, at::TensorOptions().dtype(at::kFloat));
  std::vector<uint32_t> ckeys;
  column_keys(spec.dist, j0, cols, ckeys);
  const uint32_t skey = seed_key(spec.seed);
  const GenerateRow generate_row = generate_row_fn();
  float* base = B.mutable_data_ptr<float>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      generate_row(spec, row_key(skey, static_cast<uint32_t>(k)), j0, cols, ckeys.data(), base + k * cols);
    }
  });
  return B;
}

// B's rows k0..k0+kn of columns [j0, j0 + jn): a view of B32 when B is stored, else generated
// into bbuf from the spec (ckeys: column_keys(spec.dist, j0, jn)).
at::Tensor b_block_rows(const at::Tensor& B32, const FeedbackSpec& spec, uint32_t skey, int64_t j0, int64_t jn,
                        int64_t k0, int64_t kn, const std::vector<uint32_t>& ckeys, std::vector<float>& bbuf) {
  if (B32.defined()) return B32.narrow(0, k0, kn).narrow(1, j0, jn);
  bbuf.resize(kn * jn);
  const GenerateRow generate_row = generate_row_fn();
  for (int64_t r = 0; r < kn; ++r) {
    generate_row(spec, row_key(skey, static_cast<uint32_t>(k0 + r)), j0, jn, ckeys.data(), bbuf.data() + r * jn);
  }
  return at::from_blob(bbuf.data(), {kn, jn}, at::kFloat);
}

// acc[r, c] = sum_k e[r, k] b[k, c] for a narrow e ([rows, K], contiguous; K <= kNarrowK): an outer
// product, which BLAS runs poorly. A tile of NR rows by NV vectors of VB bytes stays in registers
// across the k loop (NR * NV independent FMA chains), so each output row is written once. The tile
// is sized per path for its register file, and was chosen by measurement (2 threads, streamed
// stores, (256, 10, 8192) / (2708, 7, 1024) / (4096, 1, 2048)): AVX-512 4 x 4 zmm (16 of 32
// registers: 33 / 43 / 46 GB/s; 6 x 4: 17 / 40 / 42), AVX2 3 x 4 ymm (12 of 16: 25 / 36 / 45 GB/s;
// 2 x 4: 18 / 25 / 44; 4 x 3: 18 / 21 / 23), baseline 3 x 4 xmm. The columns go in strips of
// kStripCols, so the strip of B a tile reads (K x 256 floats, at most 16 KiB) stays in L1 while every
// row of the block passes; whole-row tiles read B from L2 and ran 2.5x slower at K = 10. With
// `stream`, full aligned vectors are written with non-temporal stores: no read-for-ownership of
// lines the kernel overwrites whole (the caller asks when no epilogue rereads the block and the
// output is larger than the caches).
constexpr int64_t kStripCols = 256;

using NarrowProduct = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t, int64_t);

// One copy of narrow_product.inc per path, compiled for that path's instructions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
namespace avx512 {
#define DFA_NARROW_VB 64
#define DFA_NARROW_NR 4
#define DFA_NARROW_NV 4
#define DFA_NARROW_STREAM(dst, v) _mm512_stream_ps(dst, reinterpret_cast<const __m512&>(v))
#include "narrow_product.inc"
#undef DFA_NARROW_VB
#undef DFA_NARROW_NR
#undef DFA_NARROW_NV
#undef DFA_NARROW_STREAM
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define DFA_NARROW_VB 32
#define DFA_NARROW_NR 3
#define DFA_NARROW_NV 4
#define DFA_NARROW_STREAM(dst, v) _mm256_stream_ps(dst, reinterpret_cast<const __m256&>(v))
#include "narrow_product.inc"
#undef DFA_NARROW_VB
#undef DFA_NARROW_NR
#undef DFA_NARROW_NV
#undef DFA_NARROW_STREAM
}  // namespace avx2
#pragma GCC pop_options
#define DFA_NARROW_PATHS 1
#endif
namespace baseline {
#define DFA_NARROW_VB 16
#define DFA_NARROW_NR 3
#define DFA_NARROW_NV 4
#if defined(__x86_64__)
#define DFA_NARROW_STREAM(dst, v) _mm_stream_ps(dst, reinterpret_cast<const __m128&>(v))
#else
#define DFA_NARROW_STREAM(dst, v) std::memcpy(dst, &(v), sizeof(v))
#endif
#include "narrow_product.inc"
#undef DFA_NARROW_VB
#undef DFA_NARROW_NR
#undef DFA_NARROW_NV
#undef DFA_NARROW_STREAM
}  // namespace baseline

NarrowProduct narrow_product_fn(bool stream) {
#ifdef DFA_NARROW_PATHS
  return stream ? for_isa<NarrowProduct>(baseline::narrow_product<true>, avx2::narrow_product<true>,
                                         avx512::narrow_product<true>)
                : for_isa<NarrowProduct>(baseline::narrow_product<false>, avx2::narrow_product<false>,
                                         avx512::narrow_product<false>);
#else
  return stream ? baseline::narrow_product<true> : baseline::narrow_product<false>;
#endif
}

// Produces one task's block e32[r0:r0+rn, :] @ B[:, block columns] ([rn, jn]) and post-processes
// it: b_rows(k0, kn) gives B's rows k0..k0+kn of the block's columns, acc_rows(rc, rcn) the fp32
// rows (pointer, row stride) that receive block rows rc..rc+rcn, finish(rc, rcn) runs the epilogue
// on them. When B's block fits in one k-step (out_features <= bk: the narrow, memory-bound shapes)
// and an epilogue reads the result (`epilogue`), rows go in chunks of kChunkEntries / jn so that each
// chunk's epilogue reads it from cache and the output crosses memory once; otherwise the k-steps
// accumulate over all rows and the epilogue runs once. `stream`: the narrow kernel writes with
// non-temporal stores (no epilogue only). Raw pointers, not tensor views, inside the
// row loop: a view costs about a microsecond, a narrow chunk of 8 rows not much more.
constexpr int64_t kChunkEntries = 64 * 1024;  // 256 KiB of fp32: L2-resident
constexpr int64_t kStreamMinBytes = int64_t{4} << 20;

// Whether the pages of [p, p + bytes) are mapped already (mincore; false where it cannot tell).
bool pages_resident(const void* p, int64_t bytes) {
#if defined(__linux__)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  std::vector<unsigned char> resident((end - first + page - 1) / page);
  if (mincore(reinterpret_cast<void*>(first), end - first, resident.data()) != 0) return false;
  return std::all_of(resident.begin(), resident.end(), [](unsigned char r) { return (r & 1) != 0; });
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

struct AccRows {
  float* data;
  int64_t ld;
  at::Tensor as_tensor(int64_t rows, int64_t cols) const {
    return at::from_blob(data, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
  }
};

template <typename BRows, typename AccRowsFn, typename Finish>
void block_product(const at::Tensor& e32, int64_t r0, int64_t rn, int64_t jn, int64_t bk, bool epilogue, bool stream,
                   BRows&& b_rows, AccRowsFn&& acc_rows, Finish&& finish) {
  const int64_t K = e32.size(1);
  if (K <= bk) {
    const at::Tensor b = b_rows(0, K);
    const int64_t chunk = epilogue ? std::max<int64_t>(4, kChunkEntries / jn) : rn;
    const NarrowProduct narrow = narrow_product_fn(stream && !epilogue);
    for (int64_t rc = 0; rc < rn; rc += chunk) {
      const int64_t rcn = std::min(chunk, rn - rc);
      const AccRows acc = acc_rows(rc, rcn);
      if (K <= kNarrowK) {
        narrow(e32.const_data_ptr<float>() + (r0 + rc) * K, b.const_data_ptr<float>(), b.stride(0), acc.data, acc.ld,
               rcn, K, jn);
      } else {
        at::Tensor out = acc.as_tensor(rcn, jn);
        at::mm_out(out, e32.narrow(0, r0 + rc, rcn), b);
      }
      finish(rc, rcn);
    }
    return;
  }
  at::Tensor acc = acc_rows(0, rn).as_tensor(rn, jn);
  for (int64_t k0 = 0; k0 < K; k0 += bk) {
    const int64_t kn = std::min(bk, K - k0);
    const at::Tensor b = b_rows(k0, kn);
    const at::Tensor e_block = e32.narrow(0, r0, rn).narrow(1, k0, kn);
    if (k0 == 0) {
      at::mm_out(acc, e_block, b);
    } else {
      acc.addmm_(e_block, b);
    }
  }
  finish(0, rn);
}

// F = cast(scale * (e @ B) * col_scale) block by block (see the top of this file); B generated from
// the spec when B32 is undefined, else its blocks are read in place.
at::Tensor tiled_project(const at::Tensor& e, const at::Tensor& B32, const FeedbackSpec& spec, int64_t W,
                         at::ScalarType out_type, const float* cs, float scale) {
  const int64_t N = e.size(0), K = e.size(1);
  // scale goes into the smaller of e and the output (gemm_project). Detached: the BLAS calls below
  // use out=.
  const bool scale_e = scale != 1.0f && K < W;
  at::Tensor e32 = e.detach().to(at::kFloat);
  if (scale_e) e32 = e32 * scale;
  e32 = e32.contiguous();
  const float out_scale = scale_e ? 1.0f : scale;
  const at::Tensor acc = at::empty({N, W}, e.options().dtype(at::kFloat));
  const at::Tensor out = out_type == at::kFloat ? acc : at::empty({N, W}, e.options().dtype(out_type));
  const uint32_t skey = seed_key(spec.seed);
  const Plan plan = plan_blocks(N, K, W);
  const at::Tensor B_read = B32.defined() || !plan.whole_rows ? B32 : generate_block(spec, K, 0, W);
  float* acc_data = acc.mutable_data_ptr<float>();
  const bool epilogue = !(out_type == at::kFloat && cs == nullptr && out_scale == 1.0f);
  // Streamed (non-temporal) stores pay off on an output larger than the caches that is written once,
  // in pages already mapped: into fresh pages (a new mmap: glibc maps large allocations afresh
  // until it has freed one of that size), the kernel's zeroing leaves each line dirty in cache and a
  // streamed store then costs that line's write-back too. Measured on this machine's 2 cores:
  // 4-16 MiB outputs in mapped pages 25 -> 37-42 GB/s streamed; in fresh pages up to 2x slower.
  const int64_t out_bytes = N * W * static_cast<int64_t>(sizeof(float));
  const bool stream = !epilogue && out_bytes >= kStreamMinBytes && pages_resident(acc_data, out_bytes);

  at::parallel_for(0, plan.col_blocks * plan.row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bbuf;
    std::vector<uint32_t> ckeys;
    for (int64_t task = begin; task < end; ++task) {
      // Consecutive tasks share a row block, so each thread reuses its rows of e.
      const int64_t j0 = (task % plan.col_blocks) * plan.bn;
      const int64_t r0 = (task / plan.col_blocks) * plan.rows_per_block;
      const int64_t jn = std::min(plan.bn, W - j0);
      const int64_t rn = std::min(plan.rows_per_block, N - r0);
      if (!B_read.defined()) column_keys(spec.dist, j0, jn, ckeys);
      block_product(
          e32, r0, rn, jn, plan.bk, epilogue, stream,
          [&](int64_t k0, int64_t kn) { return b_block_rows(B_read, spec, skey, j0, jn, k0, kn, ckeys, bbuf); },
          [&](int64_t rc, int64_t) { return AccRows{acc_data + (r0 + rc) * W + j0, W}; },
          [&](int64_t rc, int64_t rcn) { finish_block(acc, out, r0 + rc, rcn, j0, jn, out_scale, cs); });
    }
  });
  return out;
}

// One BLAS GEMM over all of K (which blocks a large K better than our k-steps), then the epilogue.
at::Tensor gemm_project(const at::Tensor& e, const at::Tensor& B, at::ScalarType out_type, const float* cs,
                        float scale) {
  const int64_t N = e.size(0), K = e.size(1), W = B.size(1);
  // scale goes into the smaller of e [N, K] and the output [N, W]: into e when K < W, so that an
  // fp32 output without col_scale needs no pass after the GEMM; else into the epilogue (a pass over
  // a vocabulary-wide e would cost more than one over the output).
  const bool scale_e = scale != 1.0f && K < W;
  at::Tensor e32 = e.detach().to(at::kFloat);
  if (scale_e) e32 = e32 * scale;
  const float out_scale = scale_e ? 1.0f : scale;
  const at::Tensor acc = at::mm(e32, B.detach().to(at::kFloat));
  if (out_type == at::kFloat && cs == nullptr && out_scale == 1.0f) return acc;
  const at::Tensor out = out_type == at::kFloat ? acc : at::empty({N, W}, e.options().dtype(out_type));
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / W), [&](int64_t begin, int64_t end) {
    finish_block(acc, out, begin, end - begin, 0, W, out_scale, cs);
  });
  return out;
}

// A virtual B up to this size is generated whole (threaded) for one BLAS GEMM when out_features
// spans several k-steps: a transient buffer, freed with the call, against the blocked path's many
// small GEMMs (measured at (1024, 512, 4096): 0.72-0.87x torch.mm blocked).
constexpr int64_t kVirtualWholeBytes = int64_t{16} << 20;

at::Tensor project_cpu(const at::Tensor& e, int64_t seed, c10::string_view distribution, double density,
                       int64_t width, double scale, const std::optional<at::Tensor>& col_scale,
                       std::optional<at::ScalarType> out_dtype) {
  const FeedbackSpec spec = parse_feedback_spec(seed, distribution, density);
  const at::ScalarType out_type = check_project_args("project", e, width, col_scale, out_dtype);
  const int64_t N = e.size(0), K = e.size(1), W = width;
  if (N == 0 || W == 0 || K == 0) return at::zeros({N, W}, e.options().dtype(out_type));
  at::Tensor cs_holder;
  const float* cs = col_scale_ptr(col_scale, cs_holder);
  if (K > plan_blocks(N, K, W).bk && K * W * static_cast<int64_t>(sizeof(float)) <= kVirtualWholeBytes) {
    return gemm_project(e, generate_block(spec, K, 0, W), out_type, cs, static_cast<float>(scale));
  }
  return tiled_project(e, at::Tensor(), spec, W, out_type, cs, static_cast<float>(scale));
}

at::Tensor project_materialized_cpu(const at::Tensor& e, const at::Tensor& B, double scale,
                                    const std::optional<at::Tensor>& col_scale,
                                    std::optional<at::ScalarType> out_dtype) {
  check_materialized_B("project_materialized", e, B);
  const at::ScalarType out_type =
      check_project_args("project_materialized", e, B.size(1), col_scale, out_dtype);
  const int64_t N = e.size(0), K = e.size(1), W = B.size(1);
  if (N == 0 || W == 0 || K == 0) return at::zeros({N, W}, e.options().dtype(out_type));
  at::Tensor cs_holder;
  const float* cs = col_scale_ptr(col_scale, cs_holder);
  const float scale_f = static_cast<float>(scale);
  // Narrow e (B's block fits one k-step): the tiled path, whose epilogue runs on cached chunks.
  if (K <= plan_blocks(N, K, W).bk) {
    return tiled_project(e, B.detach().to(at::kFloat).contiguous(), FeedbackSpec{}, W, out_type, cs, scale_f);
  }
  return gemm_project(e, B, out_type, cs, scale_f);
}

// ---------------------------------------------------------------- project_points
// out[r0:r0+rows, c0:c0+cols] = cast(f'(a) * acc * scale) for one block of a point, while the
// fp32 accumulator block (row stride ld_acc; read only: the shared layout's points overlap) is in
// cache. f'(a) is applied by ATen's own activation-backward kernels (vectorized for the CPU at hand;
// autograd's formulas: relu, the exact (erf) GELU, tanh, sigmoid, SiLU).
// The common case in one pass: relu, fp32 pre-activation and output. relu'(a) = [a > 0] from a's
// bits (positive, not NaN), selected on integers so the loop vectorizes (see gaussian_value_cpu).
DFA_ALWAYS_INLINE void relu_block_body(const float* acc, int64_t ld_acc, float* out, const float* a, int64_t ld,
                                     int64_t rows, int64_t cols, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = acc + r * ld_acc;
    const float* pre = a + r * ld;
    float* dst = out + r * ld;
    for (int64_t c = 0; c < cols; ++c) {
      const uint32_t bits = float_to_bits(pre[c]);
      const uint32_t one = (static_cast<int32_t>(bits) > 0 && bits <= 0x7f800000u) ? 0x3f800000u : 0u;
      dst[c] = (src[c] * scale) * bits_to_float(one);
    }
  }
}

using ReluBlock = void (*)(const float*, int64_t, float*, const float*, int64_t, int64_t, int64_t, float);
DFA_TARGET_AVX512 void relu_block_avx512(const float* acc, int64_t ld_acc, float* out, const float* a, int64_t ld,
                                         int64_t rows, int64_t cols, float scale) {
  relu_block_body(acc, ld_acc, out, a, ld, rows, cols, scale);
}
DFA_TARGET_AVX2 void relu_block_avx2(const float* acc, int64_t ld_acc, float* out, const float* a, int64_t ld,
                                     int64_t rows, int64_t cols, float scale) {
  relu_block_body(acc, ld_acc, out, a, ld, rows, cols, scale);
}
void relu_block_baseline(const float* acc, int64_t ld_acc, float* out, const float* a, int64_t ld, int64_t rows,
                         int64_t cols, float scale) {
  relu_block_body(acc, ld_acc, out, a, ld, rows, cols, scale);
}

void finish_point_block(const float* acc, int64_t ld_acc, const at::Tensor& out, const PointArgs& p, int64_t r0,
                        int64_t rows, int64_t c0, int64_t cols) {
  if (p.act == Activation::Relu && out.scalar_type() == at::kFloat && p.act_input.scalar_type() == at::kFloat) {
    const int64_t ld = out.size(1), offset = r0 * ld + c0;
    for_isa<ReluBlock>(relu_block_baseline, relu_block_avx2, relu_block_avx512)(acc, ld_acc, out.mutable_data_ptr<float>() + offset, p.act_input.const_data_ptr<float>() + offset,
                   ld, rows, cols, p.scale);
    return;
  }
  const at::Tensor g = at::from_blob(const_cast<float*>(acc), {rows, cols}, {ld_acc, 1},
                                     at::TensorOptions().dtype(at::kFloat));
  at::Tensor dst = out.narrow(0, r0, rows).narrow(1, c0, cols);
  at::Tensor grad = g;
  if (p.act != Activation::None) {
    const at::Tensor a = p.act_input.narrow(0, r0, rows).narrow(1, c0, cols).to(at::kFloat);
    switch (p.act) {
      case Activation::Relu: grad = at::threshold_backward(g, a, 0); break;
      case Activation::Gelu: grad = at::gelu_backward(g, a, "none"); break;
      case Activation::Tanh: grad = at::tanh_backward(g, at::tanh(a)); break;
      case Activation::Sigmoid: grad = at::sigmoid_backward(g, at::sigmoid(a)); break;
      default: grad = at::silu_backward(g, a); break;
    }
  }
  at::mul_out(dst, grad, at::scalar_tensor(p.scale, at::kFloat));  // fp32, cast once into the output
}

std::vector<at::Tensor> project_points_cpu(const at::Tensor& e, const std::optional<at::Tensor>& B, int64_t seed,
                                           c10::string_view distribution, double density, at::IntArrayRef offsets,
                                           at::IntArrayRef widths, at::ArrayRef<double> scales,
                                           const c10::List<std::optional<at::Tensor>>& act_inputs,
                                           const std::vector<std::string>& activations,
                                           std::optional<at::ScalarType> out_dtype) {
  const FeedbackSpec spec = parse_feedback_spec(seed, distribution, density);
  at::ScalarType out_type;
  std::vector<PointArgs> points =
      check_project_points_args(e, B, offsets, widths, scales, act_inputs, activations, out_dtype, &out_type);
  // Detached: the epilogue's ATen calls write with out= from the thread pool, whose threads do not
  // inherit the caller's grad mode.
  for (PointArgs& p : points) {
    if (p.act_input.defined()) p.act_input = p.act_input.detach();
  }
  const int64_t N = e.size(0), K = e.size(1);
  std::vector<at::Tensor> outs;
  for (const PointArgs& p : points) {
    outs.push_back(K == 0 ? at::zeros({N, p.width}, e.options().dtype(out_type))
                          : at::empty({N, p.width}, e.options().dtype(out_type)));
  }
  if (N == 0 || K == 0) return outs;
  const at::Tensor e32 = e.detach().to(at::kFloat).contiguous();  // detached: the BLAS calls below use out=

  // The product runs once per column span, the union of the points' column ranges (one span [0, D)
  // in the independent layout; [0, max d_l) in the shared one, where every point reads a prefix):
  // each span's column (and row) blocks form one task list, so narrow spans share the threads. A task
  // accumulates its block of e @ B[:, span] into a thread-local buffer, B's blocks generated (virtual)
  // or read in place (stored), then runs the epilogue of every point that covers part of the block
  // while it is in cache: points that share columns share the product.
  // (One GEMM over all columns then an epilogue pass was 3x slower for out_features 1: BLAS makes a
  // poor outer product, and the [N, D] result leaves the cache before the epilogue reads it.)
  const at::Tensor B32 = B.has_value() ? B->detach().to(at::kFloat).contiguous() : at::Tensor();
  // A task's B: B32 read in place, its span's B generated once (whole-rows plans, virtual B:
  // span_B[span] holds columns [start, stop)), or blocks generated by the task.
  struct Task { int64_t j0, jn, r0, rn, bk; size_t span; };
  std::vector<Task> tasks;
  std::vector<std::pair<int64_t, at::Tensor>> span_B;  // (first column, B [K, span width] or undefined)
  for (const auto& [start, stop] : column_spans(points)) {
    const Plan plan = plan_blocks(N, K, stop - start);
    span_B.emplace_back(start, !B32.defined() && plan.whole_rows ? generate_block(spec, K, start, stop - start)
                                                                 : at::Tensor());
    for (int64_t rb = 0; rb < plan.row_blocks; ++rb) {
      for (int64_t cb = 0; cb < plan.col_blocks; ++cb) {
        const int64_t j0 = start + cb * plan.bn, r0 = rb * plan.rows_per_block;
        tasks.push_back({j0, std::min(plan.bn, stop - j0), r0, std::min(plan.rows_per_block, N - r0), plan.bk,
                         span_B.size() - 1});
      }
    }
  }
  const uint32_t skey = seed_key(spec.seed);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bbuf, abuf;
    std::vector<uint32_t> ckeys;
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];  // columns [j0, j0 + jn) of B
      const auto& [span_start, span_b] = span_B[task.span];
      if (!B32.defined() && !span_b.defined()) column_keys(spec.dist, task.j0, task.jn, ckeys);
      block_product(
          e32, task.r0, task.rn, task.jn, task.bk, /*epilogue=*/true, /*stream=*/false,
          [&](int64_t k0, int64_t kn) {
            if (span_b.defined()) return span_b.narrow(0, k0, kn).narrow(1, task.j0 - span_start, task.jn);
            return b_block_rows(B32, spec, skey, task.j0, task.jn, k0, kn, ckeys, bbuf);
          },
          [&](int64_t, int64_t rcn) {  // every chunk reuses the same thread-local rows
            abuf.resize(rcn * task.jn);
            return AccRows{abuf.data(), task.jn};
          },
          [&](int64_t rc, int64_t rcn) {
            for (size_t l = 0; l < points.size(); ++l) {  // every point that reads some of these columns
              const PointArgs& p = points[l];
              const int64_t lo = std::max(task.j0, p.offset), hi = std::min(task.j0 + task.jn, p.offset + p.width);
              if (lo >= hi) continue;
              finish_point_block(abuf.data() + (lo - task.j0), task.jn, outs[l], p, task.r0 + rc, rcn,
                                 lo - p.offset, hi - lo);
            }
          });
    }
  });
  return outs;
}

}  // namespace

at::Tensor feedback_matrix_cpu(const FeedbackSpec& spec, int64_t rows, int64_t cols,
                               at::ScalarType dtype) {
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(dtype));
  if (out.numel() == 0) return out;
  std::vector<uint32_t> ckeys;
  column_keys(spec.dist, 0, cols, ckeys);
  const uint32_t skey = seed_key(spec.seed);
  const GenerateRow generate_row = generate_row_fn();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "feedback_matrix_cpu", [&] {
    scalar_t* base = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / cols), [&](int64_t begin, int64_t end) {
      // Non-fp32 rows are generated in fp32 (exact values), then cast.
      std::vector<float> row(std::is_same_v<scalar_t, float> ? 0 : cols);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* dst = base + i * cols;
        float* gen = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(dst) : row.data();
        generate_row(spec, row_key(skey, static_cast<uint32_t>(i)), 0, cols, ckeys.data(), gen);
        if (!std::is_same_v<scalar_t, float>) {
          for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<scalar_t>(row[c]);
        }
      }
    });
  });
  return out;
}

}  // namespace dfa_kernels

TORCH_LIBRARY_IMPL(dfa_kernels, CPU, m) {
  m.impl("project", &dfa_kernels::project_cpu);
  m.impl("project_materialized", &dfa_kernels::project_materialized_cpu);
  m.impl("project_points", &dfa_kernels::project_points_cpu);
}
