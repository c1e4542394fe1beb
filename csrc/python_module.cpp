// dfa_kernels._C: importing it loads this library, whose static initializers register the ops
// (torch.ops.dfa_kernels.*). It also reports how the library was built. Only setup.py builds it.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>

#include "dfa_kernels/cpu_isa.h"
#include "dfa_kernels/ops.h"

namespace py = pybind11;

// setup.py passes strings as bare tokens (e.g. -DDFA_CUDA_ARCHS=8.0,9.0): no shell quoting needed.
#define DFA_STRINGIZE_(...) #__VA_ARGS__
#define DFA_STRINGIZE(...) DFA_STRINGIZE_(__VA_ARGS__)

#ifndef DFA_TORCH_VERSION
#error "DFA_TORCH_VERSION (torch.__version__ at build time) is set by setup.py, which alone builds this module"
#endif

// The torch this library was built against (torch.__version__, e.g. 2.14.1+cu130; TORCH_VERSION
// lacks the local part, +cu130 or +cpu), in an ELF section of its own: dfa_kernels/ops.py reads it
// from the file before loading the library, which under another torch fails with undefined symbols
// or, worse, loads and misbehaves.
#if defined(__ELF__)
#define DFA_RECORD __attribute__((section(".dfa_torch_version"), used))
#else  // elsewhere only build_config() reports it, once loaded
#define DFA_RECORD
#endif
extern "C" DFA_RECORD const char dfa_kernels_torch_version_built[] = DFA_STRINGIZE(DFA_TORCH_VERSION);

namespace {

#ifdef DFA_CUDA_COMPILED
// The arch list, stringized: split it here.
#ifndef DFA_CUDA_ARCHS
#define DFA_CUDA_ARCHS
#endif

py::list cuda_archs() {
  const std::string s = DFA_STRINGIZE(DFA_CUDA_ARCHS);
  py::list out;
  size_t start = 0;
  while (start < s.size()) {
    const size_t end = std::min(s.find(',', start), s.size());
    if (end > start) out.append(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}
#endif

py::dict build_config() {
  py::dict d;
#ifdef DFA_CUDA_COMPILED
  d["cuda_compiled"] = true;
  d["cuda_archs"] = cuda_archs();
  const int v = dfa_kernels::cuda_runtime_version_built();
  d["cuda_version_built"] = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = py::list();
  d["cuda_version_built"] = py::none();
#endif
  d["torch_version_built"] = dfa_kernels_torch_version_built;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

// What the libraries loaded at run time allow (empty on a CPU-only build).
py::dict runtime_info() {
  py::dict d;
#ifdef DFA_CUDA_COMPILED
  d["grouped_gemm"] = dfa_kernels::grouped_gemm_status();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dfa_kernels compiled ops (registered under torch.ops.dfa_kernels)";
  m.def("build_config", &build_config,
        "How this library was built: cuda_compiled, cuda_archs, torch_version_built, "
        "cuda_version_built, openmp.");
  m.def("cpu_isa", [] { return std::string(dfa_kernels::cpu_isa_name(dfa_kernels::cpu_isa())); },
        "The instruction-set path the CPU kernels take: avx512, avx2 or baseline (DFA_KERNELS_CPU_ISA forces one).");
  m.def("cpu_isa_detected", [] { return std::string(dfa_kernels::cpu_isa_name(dfa_kernels::cpu_isa_detected())); },
        "The best instruction-set path this CPU runs.");
  m.def("set_cpu_isa", &dfa_kernels::set_cpu_isa, py::arg("name"),
        "Switches the CPU kernels' instruction-set path for this process (tests, benchmarks).");
  m.def("runtime_info", &runtime_info,
        "What the loaded libraries allow: grouped_gemm (cuBLAS's grouped GEMM, or one GEMM per layer, and why).");
}
