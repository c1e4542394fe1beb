// nvcuda::wmma at the API level, for the emulator (cuda_emu.h). The real fragments' element layout
// is unspecified, so kernels may only use the API; the mock holds the whole 16x16 tile of an A or B
// fragment in every lane (loads are reads: no race), and an accumulator distributed over the warp
// (lane l owns elements l, l + 32, ... of the row-major tile), so that a store is 32 lanes writing
// disjoint elements and a reader of the stored tile needs the __syncwarp a GPU needs.
// Checked as the hardware requires: 256-bit aligned pointers, ldm a multiple of 16 bytes.
// mma_sync accumulates in fp32 from the 16-bit inputs (exact products, as the tensor cores).
#pragma once

#include <cstdint>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;

// A/B operand tiles: rows x cols, the whole tile in every lane.
template <int R, int C, class T, class Layout>
struct operand_fragment {
  float v[R][C];
};
template <int M, int N, int K, class T, class Layout>
struct fragment<matrix_a, M, N, K, T, Layout> : operand_fragment<M, K, T, Layout> {};
template <int M, int N, int K, class T, class Layout>
struct fragment<matrix_b, M, N, K, T, Layout> : operand_fragment<K, N, T, Layout> {};

template <int M, int N, int K>
struct fragment<accumulator, M, N, K, float, void> {
  static constexpr int num_elements = M * N / 32;
  float x[num_elements];
};

namespace detail {
inline unsigned lane() { return ::dfa_emu::tls_linear_tid % 32; }
inline float to_float(__half h) { return __half2float(h); }
inline float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }

inline void check_ptr_ldm(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  ::dfa_emu::check_aligned(p, 32, what);  // "mptr must be a 256-bit aligned pointer"
  if ((ldm * elem_bytes) % 16 != 0) {
    ::dfa_emu::fail("%s: ldm = %u elements (%zu bytes) is not a multiple of 16 bytes", what, ldm, ldm * elem_bytes);
  }
}

template <int R, int C, class T>
void load_tile(float (&v)[R][C], const T* p, unsigned ldm, bool row_major) {
  check_ptr_ldm(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  if (ldm < static_cast<unsigned>(row_major ? C : R)) ::dfa_emu::fail("wmma::load_matrix_sync: ldm %u below the tile", ldm);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) v[r][c] = to_float(row_major ? p[r * ldm + c] : p[c * ldm + r]);
  }
}
}  // namespace detail

// A or B operand (row- or column-major as the fragment's layout says).
template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Use, matrix_a> || std::is_same_v<Use, matrix_b>, "an operand fragment");
  detail::load_tile(f.v, p, ldm, std::is_same_v<Layout, row_major>);
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float value) {
  for (float& x : f.x) x = value;
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  const unsigned lane = detail::lane();
  for (int i = 0; i < fragment<accumulator, M, N, K, float>::num_elements; ++i) {
    const int idx = static_cast<int>(lane) + 32 * i, r = idx / N, col = idx % N;
    float acc = c.x[i];
    for (int k = 0; k < K; ++k) acc = fmaf(a.v[r][k], b.v[k][col], acc);
    d.x[i] = acc;
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check_ptr_ldm(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  if (ldm < static_cast<unsigned>(layout == mem_row_major ? N : M)) {
    ::dfa_emu::fail("wmma::store_matrix_sync: ldm %u below the tile", ldm);
  }
  const unsigned lane = detail::lane();
  for (int i = 0; i < fragment<accumulator, M, N, K, float>::num_elements; ++i) {
    const int idx = static_cast<int>(lane) + 32 * i, r = idx / N, col = idx % N;
    p[layout == mem_row_major ? r * ldm + col : col * ldm + r] = f.x[i];
  }
}

}  // namespace wmma
}  // namespace nvcuda
