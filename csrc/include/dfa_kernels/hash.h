// The feedback matrix as a function: B[i, j] = dist(hash(seed, i, j)).
//
// This header is the single definition of the hash. The CPU (C++) and CUDA kernels include it;
// the Triton kernels (dfa_kernels/triton/hash.py) and the PyTorch reference
// (dfa_kernels/reference.py) transcribe it operation by operation, and tests/test_hash.py checks
// all of them against the test vectors below.
//
// All arithmetic is on uint32 and wraps modulo 2^32.
//
//   mix32(x)       = lowbias32 (C. Wellons): x ^= x >> 16; x *= 0x7feb352d;
//                                            x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
//   seed_key(s)    = mix32(s ^ 0x9e3779b9)                     s = seed, 0 <= seed < 2^32
//   row_key(k, i)  = mix32(k + i * 0x9e3779b9)                 i = row    (0 <= i < out_features)
//   col_key(j)     = mix32(j * 0x85ebca6b + 0x632be5ab)        j = column (0 <= j < D)
//   hash(s, i, j)  = mix32(row_key(seed_key(s), i) ^ col_key(j))
//
// Row and column keys are computed once per tile row / column, so a generated entry costs one
// mix32 (two multiplies, three xor-shifts) plus an xor.
//
// Distributions (h = hash(seed, i, j)):
//   uniform     [-1, 1):  (h >> 8) * 2^-23 - 1              exact in fp32: bit-identical everywhere
//   rademacher  {-1, +1}: w = hash(seed, i, j >> 5); bit (j & 31) of w set -> +1, else -1
//                          (32 entries per hash word; exact: bit-identical everywhere)
//   sparse      {-1, 0, +1}: t = floor(density * 2^24 + 0.5); (h >> 8) < t -> (h & 1 ? +1 : -1), else 0
//                          (P[nonzero] = density; exact: bit-identical everywhere)
//   gaussian    N(0, 1), Box-Muller on two 24-bit uniforms:
//                          u1 = ((h >> 8) + 1) * 2^-24 in (0, 1],  u2 = (mix32(h ^ 0x68e31da4) >> 8) * 2^-24,
//                          z = sqrt(-2 ln u1) * cos(2 pi u2), evaluated in fp32.
//                          log/cos/sqrt differ in their last bits between libm, CUDA and Triton, so
//                          gaussian entries agree only to a tolerance (|diff| <= 1e-5 * (1 + |z|)).
//
// Published test vectors (seed, i, j) -> hash, uniform, rademacher:
//   (seed, i, j)                 hash         uniform               rademacher  gaussian (approx.)
//   (0, 0, 0)                 -> 0xde727c7a,  0.7378687858581543,   -1,         -0.299004
//   (0, 0, 1)                 -> 0x35e68b34, -0.5789018869400024,   +1,          1.689729
//   (0, 1, 0)                 -> 0x89d77faa,  0.07688891887664795,  -1,          0.936689
//   (1, 0, 0)                 -> 0xa5f47565,  0.29652273654937744,  +1,          0.145733
//   (42, 3, 17)               -> 0x63e4843a, -0.2195887565612793,   -1,          0.303055
//   (123456789, 50256, 4095)  -> 0x6c5dee1b, -0.15338349342346191,  -1,         -0.746140
//   (4294967295, 7, 1000000)  -> 0x8aa1670a,  0.08305060863494873,  -1,         -0.573929
//   (rademacher reads word hash(seed, i, j >> 5), so its column differs from the hash column.)

#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DFA_HD __host__ __device__ __forceinline__
#else
#define DFA_HD inline
#endif

namespace dfa_kernels {

enum class Distribution : int { Uniform = 0, Gaussian = 1, Rademacher = 2, Sparse = 3 };

DFA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

DFA_HD uint32_t seed_key(uint32_t seed) { return mix32(seed ^ 0x9e3779b9u); }
DFA_HD uint32_t row_key(uint32_t skey, uint32_t i) { return mix32(skey + i * 0x9e3779b9u); }
DFA_HD uint32_t col_key(uint32_t j) { return mix32(j * 0x85ebca6bu + 0x632be5abu); }
DFA_HD uint32_t hash_from_keys(uint32_t rkey, uint32_t ckey) { return mix32(rkey ^ ckey); }

DFA_HD uint32_t hash(uint32_t seed, uint32_t i, uint32_t j) {
  return hash_from_keys(row_key(seed_key(seed), i), col_key(j));
}

DFA_HD uint32_t sparse_threshold(double density) {
  double t = std::floor(density * 16777216.0 + 0.5);
  return t <= 0.0 ? 0u : (t >= 16777216.0 ? 16777216u : static_cast<uint32_t>(t));
}

DFA_HD float uniform_value(uint32_t h) {
  return static_cast<float>(h >> 8) * 1.1920928955078125e-07f - 1.0f;  // 2^-23
}

DFA_HD float gaussian_value(uint32_t h) {
  const float u1 = static_cast<float>((h >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float u2 = static_cast<float>(mix32(h ^ 0x68e31da4u) >> 8) * 5.9604644775390625e-08f;
#if defined(__CUDA_ARCH__)
  // cos(2 pi u2) as cospif(2 u2): an exact argument reduction, where cosf's slow path for large
  // arguments (which the compiler cannot rule out) costs a local-memory stack frame in every kernel
  // that generates B. Within the tolerance contract above (the host's fl(2 pi) differs by ~1e-7 |z|).
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
#else
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
#endif
}

DFA_HD float sparse_value(uint32_t h, uint32_t threshold) {
  return (h >> 8) < threshold ? ((h & 1u) ? 1.0f : -1.0f) : 0.0f;
}

DFA_HD float rademacher_value(uint32_t word, uint32_t j) {
  return ((word >> (j & 31u)) & 1u) ? 1.0f : -1.0f;
}

// B[i, j] from the row key of i. For rademacher, `ckey` must be col_key(j >> 5); otherwise col_key(j).
DFA_HD float value_from_keys(Distribution dist, uint32_t rkey, uint32_t ckey, uint32_t j,
                             uint32_t threshold) {
  const uint32_t h = hash_from_keys(rkey, ckey);
  switch (dist) {
    case Distribution::Uniform: return uniform_value(h);
    case Distribution::Gaussian: return gaussian_value(h);
    case Distribution::Rademacher: return rademacher_value(h, j);
    default: return sparse_value(h, threshold);
  }
}

DFA_HD uint32_t col_key_for(Distribution dist, uint32_t j) {
  return col_key(dist == Distribution::Rademacher ? (j >> 5) : j);
}

DFA_HD float feedback_value(Distribution dist, uint32_t seed, uint32_t i, uint32_t j,
                            uint32_t threshold) {
  return value_from_keys(dist, row_key(seed_key(seed), i), col_key_for(dist, j), j, threshold);
}

}  // namespace dfa_kernels
