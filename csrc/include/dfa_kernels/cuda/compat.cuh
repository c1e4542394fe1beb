// What the CUDA kernels' headers (csrc/include/dfa_kernels/cuda/) need from their compiler, in one
// place, so that the same device code builds two ways:
//   * under nvcc (csrc/cuda/*.cu): the CUDA runtime, WMMA, `<<<>>>` launches;
//   * under a host compiler with DFA_CUDA_ON_CPU defined (tests/cuda_on_cpu/): the emulator, which
//     runs each block on host threads (__syncthreads a barrier, WMMA a checked mock), so that ASan,
//     UBSan and TSan see the kernels' indexing, bounds and barriers.
// Kernels use only what this header provides for the things the two differ in: launch_kernel,
// DFA_SHARED / DFA_EXTERN_SHARED, vec_load / vec_store (alignment-checked under the emulator).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define DFA_HAS_WMMA 1  // this device pass has the tensor cores' WMMA (sm_80+)
#else
#define DFA_HAS_WMMA 0
#endif
#elif defined(DFA_CUDA_ON_CPU)
#include "cuda_emu.h"
#define DFA_HAS_WMMA 1
#else
#error "dfa_kernels/cuda headers build under nvcc, or on the host with DFA_CUDA_ON_CPU (the emulator)"
#endif

namespace dfa_kernels {

#if defined(__CUDACC__)
// Static and dynamic shared memory. Under the emulator each declaration is one exact-size,
// poisoned allocation per block (ASan sees overruns, stale reads show as NaN), counted against
// the 48 KiB a block may use without opting in.
#define DFA_SHARED(type, name) __shared__ type name
#define DFA_EXTERN_SHARED(type, name) extern __shared__ type name[]

// The one launch path of every kernel: <<<>>> here, the host launcher under the emulator.
template <class... KArgs, class... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(static_cast<Args&&>(args)...);
}

template <class V>
__device__ __forceinline__ V vec_load(const void* p) {
  return *reinterpret_cast<const V*>(p);
}
template <class V>
__device__ __forceinline__ void vec_store(void* p, const V& v) {
  *reinterpret_cast<V*>(p) = v;
}
#else
#define DFA_SHARED(type, name) type& name = ::dfa_emu::shared_var<type>([] {})
#define DFA_EXTERN_SHARED(type, name) type* name = ::dfa_emu::dynamic_shared<type>()

template <class... KArgs, class... Args>
inline void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                          Args&&... args) {
  ::dfa_emu::launch(kernel, grid, block, smem, static_cast<Args&&>(args)...);
}

// A vector access must be aligned to its size (16 bytes for float4/uint4, 8 for uint2), as on
// the GPU, where a misaligned one faults.
template <class V>
inline V vec_load(const void* p) {
  ::dfa_emu::check_aligned(p, sizeof(V), "vector load");
  return *static_cast<const V*>(p);
}
template <class V>
inline void vec_store(void* p, const V& v) {
  ::dfa_emu::check_aligned(p, sizeof(V), "vector store");
  *static_cast<V*>(p) = v;
}
#endif

}  // namespace dfa_kernels
