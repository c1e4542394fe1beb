// The CUDA execution model on host threads, for running the kernels of
// csrc/include/dfa_kernels/cuda/ unmodified under ASan, UBSan and TSan (compat.cuh includes this
// when DFA_CUDA_ON_CPU is defined).
//
// A launch runs its blocks on `blocks_in_flight()` slots at once (default 2, so that TSan also sees
// two blocks touching the same global memory), one std::thread per CUDA thread. Inside a block:
//   * __syncthreads() is a std::barrier of the block's threads; __syncwarp() one of the warp's. A
//     thread that returns leaves both (arrive_and_drop), as an exited thread does on sm_70+.
//   * Shared memory: every DFA_SHARED declaration is one exact-size allocation per block and the
//     dynamic part another, filled with 0xFF bytes (NaN as floats), so an overrun is a heap
//     overflow for ASan and a read before any write shows in the results.
// Checked at every launch, as the driver would refuse them: grid and block limits, 48 KiB of
// shared memory (static + dynamic, no opt-in), 4 KiB of kernel parameters; at every vector access
// and WMMA load/store: alignment. A violation prints "cuda_emu: ..." and aborts.
//
// What it cannot show: speed, register spills, warp-level timing (all 32 lanes of a warp are free
// threads here, which is stricter than a GPU for code that assumes lockstep), tensor-core rounding.
#pragma once

#include <cuda_bf16.h>   // host-compilable: __half, __nv_bfloat16 and their conversions
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // host-compilable: dim3, uint3, float4, make_float4, cudaStream_t
#include <dlfcn.h>

#include <barrier>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace dfa_emu {

constexpr size_t kSharedLimit = 48 * 1024;  // per block, without cudaFuncSetAttribute opt-in
constexpr size_t kParamLimit = 4096;        // kernel parameter space the kernels are written for

[[noreturn]] inline void fail(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fputs("cuda_emu: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::fflush(stderr);
  std::abort();
}

inline void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail("%s of %zu bytes at %p is not %zu-byte aligned", what, bytes, p, bytes);
  }
}

struct AlignedDelete {
  size_t align;
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(align)); }
};
using Buffer = std::unique_ptr<unsigned char[], AlignedDelete>;

inline Buffer poisoned(size_t bytes, size_t align) {
  align = std::max<size_t>(align, 16);
  auto* p = static_cast<unsigned char*>(::operator new[](std::max<size_t>(bytes, 1), std::align_val_t(align)));
  std::memset(p, 0xFF, bytes);
  return Buffer(p, AlignedDelete{align});
}

// One block in flight: its barriers and its shared memory.
struct Slot {
  std::unique_ptr<std::barrier<>> block_bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::mutex mu;
  std::vector<std::pair<const void*, Buffer>> statics;  // declaration site -> this block's buffer
  size_t static_bytes = 0;
  Buffer dynamic{nullptr, AlignedDelete{16}};
  size_t dynamic_bytes = 0;
  uint3 block{0, 0, 0};
};

inline thread_local uint3 tls_threadIdx{0, 0, 0}, tls_blockIdx{0, 0, 0};
inline thread_local Slot* tls_slot = nullptr;
inline thread_local unsigned tls_linear_tid = 0;
inline dim3 g_blockDim, g_gridDim;

// The launches of this process, for the driver's report: kernel name, grid, block, smem.
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

// The kernel's name for the report and error messages. Kernels have internal linkage (no dynamic
// symbol), so the debug info names them: addr2line, once per kernel.
inline std::string symbol_name(const void* fn) {
  static std::mutex mu;
  static std::map<const void*, std::string> names;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = names.find(fn); it != names.end()) return it->second;
  Dl_info info{};
  std::string name = "?";
  if (dladdr(fn, &info) != 0 && info.dli_fname != nullptr) {
    char cmd[512];
    std::snprintf(cmd, sizeof cmd, "addr2line -f -C -e '%s' 0x%zx 2>/dev/null", info.dli_fname,
                  static_cast<size_t>(reinterpret_cast<uintptr_t>(fn) - reinterpret_cast<uintptr_t>(info.dli_fbase)));
    if (FILE* f = popen(cmd, "r")) {
      char line[512];
      if (std::fgets(line, sizeof line, f) != nullptr) {
        name = line;
        while (!name.empty() && (name.back() == '\n' || name.back() == '\r')) name.pop_back();
      }
      pclose(f);
    }
  }
  return names[fn] = name;
}

inline int blocks_in_flight() {
  const char* v = std::getenv("DFA_EMU_BLOCKS_IN_FLIGHT");
  const int n = v != nullptr ? std::atoi(v) : 2;
  return n >= 1 ? n : 1;
}

template <class T, class Site>
T& shared_var(Site) {
  static const char site = 0;  // one per declaration (each DFA_SHARED passes its own lambda type)
  Slot* s = tls_slot;
  if (s == nullptr) fail("shared memory declared outside a kernel launch");
  std::lock_guard<std::mutex> lock(s->mu);
  for (auto& [key, buf] : s->statics) {
    if (key == &site) return *reinterpret_cast<T*>(buf.get());
  }
  s->static_bytes += sizeof(T);
  if (s->static_bytes + s->dynamic_bytes > kSharedLimit) {
    fail("block uses %zu bytes of static + %zu of dynamic shared memory, over the %zu-byte limit",
         s->static_bytes, s->dynamic_bytes, kSharedLimit);
  }
  s->statics.emplace_back(&site, poisoned(sizeof(T), alignof(T)));
  return *reinterpret_cast<T*>(s->statics.back().second.get());
}

template <class T>
T* dynamic_shared() {
  Slot* s = tls_slot;
  if (s == nullptr) fail("dynamic shared memory used outside a kernel launch");
  if (s->dynamic_bytes == 0) fail("kernel uses dynamic shared memory but was launched with 0 bytes");
  check_aligned(s->dynamic.get(), alignof(T), "dynamic shared memory");
  return reinterpret_cast<T*>(s->dynamic.get());
}

inline void syncthreads() { tls_slot->block_bar->arrive_and_wait(); }

inline void syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask (0x%x) is not emulated", mask);
  tls_slot->warp_bars[tls_linear_tid / 32]->arrive_and_wait();
}

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  const std::string name = symbol_name(reinterpret_cast<const void*>(kernel));
  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  const unsigned nt = block.x * block.y * block.z;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    fail("%s: invalid grid (%u, %u, %u)", name.c_str(), grid.x, grid.y, grid.z);
  }
  if (nt < 1 || nt > 1024 || block.z > 64) fail("%s: invalid block (%u, %u, %u)", name.c_str(), block.x, block.y, block.z);
  if (smem > kSharedLimit) fail("%s: %zu bytes of dynamic shared memory, over %zu", name.c_str(), smem, kSharedLimit);
  constexpr size_t param_bytes = (size_t{0} + ... + sizeof(KArgs));
  static_assert(param_bytes <= kParamLimit, "kernel parameters over the 4 KiB the kernels are written for");
  launch_log().push_back({name, grid, block, smem});

  // Arguments converted to the kernel's parameter types once, as the runtime copies them.
  const std::tuple<std::decay_t<KArgs>...> params(static_cast<Args&&>(args)...);
  g_gridDim = grid;
  g_blockDim = block;
  const unsigned slots = static_cast<unsigned>(std::min<unsigned long long>(blocks, blocks_in_flight()));
  std::vector<std::unique_ptr<Slot>> slot(slots);
  for (auto& s : slot) s = std::make_unique<Slot>();

  // Per slot: every block starts at a barrier whose completion (one thread) gives the block fresh
  // barriers and shared memory.
  struct Setup {
    Slot* s;
    unsigned nt;
    size_t smem;
    void operator()() noexcept {
      s->block_bar = std::make_unique<std::barrier<>>(nt);
      s->warp_bars.clear();
      for (unsigned w = 0; w * 32 < nt; ++w) s->warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32u, nt - 32 * w)));
      s->statics.clear();
      s->static_bytes = 0;
      s->dynamic_bytes = smem;
      s->dynamic = smem > 0 ? poisoned(smem, 16) : Buffer(nullptr, AlignedDelete{16});
    }
  };
  std::vector<std::unique_ptr<std::barrier<Setup>>> start(slots);
  for (unsigned i = 0; i < slots; ++i) start[i] = std::make_unique<std::barrier<Setup>>(nt, Setup{slot[i].get(), nt, smem});

  std::vector<std::thread> threads;
  threads.reserve(size_t{slots} * nt);
  for (unsigned si = 0; si < slots; ++si) {
    for (unsigned t = 0; t < nt; ++t) {
      threads.emplace_back([&, si, t] {
        tls_slot = slot[si].get();
        tls_linear_tid = t;
        tls_threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        for (unsigned long long b = si; b < blocks; b += slots) {
          start[si]->arrive_and_wait();
          tls_blockIdx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                          static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
          std::apply(kernel, params);
          tls_slot->warp_bars[t / 32]->arrive_and_drop();
          tls_slot->block_bar->arrive_and_drop();
        }
        start[si]->arrive_and_wait();  // the last block's memory is released by the setup after it
        tls_slot = nullptr;
      });
    }
  }
  for (auto& th : threads) th.join();
}

}  // namespace dfa_emu

#ifndef __launch_bounds__
#define __launch_bounds__(...)  // a register budget: nothing to emulate
#endif
#define threadIdx (::dfa_emu::tls_threadIdx)
#define blockIdx (::dfa_emu::tls_blockIdx)
#define blockDim (::dfa_emu::g_blockDim)
#define gridDim (::dfa_emu::g_gridDim)
inline void __syncthreads() { ::dfa_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::dfa_emu::syncwarp(mask); }
[[noreturn]] inline void __trap() { ::dfa_emu::fail("__trap() reached"); }

#include "wmma_emu.h"
