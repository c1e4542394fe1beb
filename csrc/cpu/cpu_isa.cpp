// The CPU kernels' instruction-set path (cpu_isa.h).
#include "dfa_kernels/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace dfa_kernels {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

CpuIsa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
    return CpuIsa::Avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Baseline;
}

CpuIsa parse(const std::string& name, const char* where) {
  for (int i = 0; i < 3; ++i) {
    if (name == kNames[i]) {
      const CpuIsa isa = static_cast<CpuIsa>(i);
      TORCH_CHECK(isa <= cpu_isa_detected(), where, " asks for the ", name, " path, but this CPU runs at most ",
                  kNames[static_cast<int>(cpu_isa_detected())]);
      return isa;
    }
  }
  TORCH_CHECK(false, where, " must be one of avx512, avx2, baseline; got \"", name, "\"");
}

std::atomic<int> active{-1};  // -1: not chosen yet

}  // namespace

const char* cpu_isa_name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

CpuIsa cpu_isa_detected() {
  static const CpuIsa detected = detect();
  return detected;
}

CpuIsa cpu_isa() {
  int isa = active.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv("DFA_KERNELS_CPU_ISA");
    const CpuIsa chosen = env != nullptr && *env != '\0' ? parse(env, "DFA_KERNELS_CPU_ISA") : cpu_isa_detected();
    int expected = -1;
    active.compare_exchange_strong(expected, static_cast<int>(chosen));
    isa = active.load(std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(isa);
}

void set_cpu_isa(const std::string& name) { active.store(static_cast<int>(parse(name, "set_cpu_isa")), std::memory_order_relaxed); }

}  // namespace dfa_kernels
