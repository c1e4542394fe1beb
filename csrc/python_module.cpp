// dfa_kernels._C: importing it loads this library, whose static initializers register the ops
// (torch.ops.dfa_kernels.*). It also reports how the library was built. Only setup.py builds it.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <algorithm>
#include <string>

#include "dfa_kernels/cpu_isa.h"
#include "dfa_kernels/ops.h"

namespace py = pybind11;

namespace {

#ifdef DFA_CUDA_COMPILED
// setup.py passes the arch list as bare tokens (e.g. -DDFA_CUDA_ARCHS=8.0,9.0): no shell quoting
// needed. Stringize and split them here.
#define DFA_STRINGIZE_(...) #__VA_ARGS__
#define DFA_STRINGIZE(...) DFA_STRINGIZE_(__VA_ARGS__)
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
  d["torch_version_built"] = TORCH_VERSION;
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
