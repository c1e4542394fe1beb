// The instruction-set path of the CPU kernels (csrc/cpu/): each hand-tiled loop is compiled once per
// path, with tiles sized for that path's register file (AVX-512: 32 zmm, AVX2: 16 ymm, baseline
// x86-64: 16 xmm), and one path is chosen per process: the best the CPU supports, or the one
// DFA_KERNELS_CPU_ISA names (avx512, avx2, baseline), so that a machine with AVX-512 still tests and
// measures the AVX2 path most CPUs take. Outside x86-64 there is one path, "baseline".
#pragma once

#include <string>

namespace dfa_kernels {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
// The best path this CPU runs.
CpuIsa cpu_isa_detected();
// The path the kernels take: DFA_KERNELS_CPU_ISA if set (read at the first call; a name this CPU
// cannot run is an error), else the detected one.
CpuIsa cpu_isa();
// Switches the path for this process (tests, benchmarks); throws on a name this CPU cannot run.
void set_cpu_isa(const std::string& name);

}  // namespace dfa_kernels
