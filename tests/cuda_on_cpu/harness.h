// The CUDA-on-CPU harness: runs the CUDA backend's launch sequences (csrc/include/dfa_kernels/cuda/)
// on the emulator, case by case, for tests/test_cuda_on_cpu.py. A case is one line of key=value
// tokens naming the op, its shapes and the raw files of its inputs and outputs; the harness does
// what the .cu launcher does around the kernels (plans, e padding, workspaces, operand copies) with
// exact-size host buffers, and prints one JSON line per case: the plan and every launch.
#pragma once

#include <cublas_v2.h>

#include "dfa_kernels/cuda/plan.h"
#include "dfa_kernels/hash.h"

namespace dfa_kernels {
enum class FpKind : int;  // common.cuh; only the kernel files include the device code
}

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace harness {

// "Device memory": an exact-size heap block (ASan sees any access past it), filled with 0xFF
// (NaN as floats, so an output element no kernel wrote shows up).
struct Mem {
  std::unique_ptr<unsigned char[]> bytes;
  size_t size = 0;
  static Mem alloc(size_t n);
  static Mem read(const std::string& path, size_t expect_bytes);
  void write(const std::string& path) const;
  template <class T>
  T* as() { return reinterpret_cast<T*>(bytes.get()); }
};

struct Case {
  std::map<std::string, std::string> kv;
  const std::string& str(const std::string& key) const;
  int64_t i64(const std::string& key) const;
  double f64(const std::string& key) const;
  bool has(const std::string& key) const { return kv.count(key) != 0; }
  std::vector<std::string> list(const std::string& key) const;  // comma-separated
};

// Element size of a kind name: f32, f16, bf16 (and f64 for feedback_matrix).
size_t elem_bytes(const std::string& kind);
dfa_kernels::FpKind kind_of(const std::string& kind);  // harness_project.cpp
cudaDataType_t cuda_type_of(const std::string& kind);
dfa_kernels::Distribution dist_of(const std::string& name);
uint32_t threshold_of(const Case& c);  // the sparse distribution's, from density
dfa_kernels::DeviceCaps caps_of(const Case& c);  // sms, cc_major

// Each returns the case's JSON fields (after "op"): the plan it ran.
std::string run_project(const Case& c);
std::string run_project_materialized(const Case& c);
std::string run_feedback_matrix(const Case& c);
std::string run_project_points(const Case& c);
std::string run_grouped_weight_grad(const Case& c);

// The host GEMMs standing in for cuBLAS (harness_gemm.cpp): cuBLAS's signatures and argument checks
// (a rejected call returns CUBLAS_STATUS_INVALID_VALUE and says why on stderr), fp32 accumulation.
cublasStatus_t host_gemm_ex(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType_t, int, const void*, cudaDataType_t, int, const void*, void*,
                            cudaDataType_t, int, cublasComputeType_t, cublasGemmAlgo_t);
cublasStatus_t host_gemm_grouped(cublasHandle_t, const cublasOperation_t[], const cublasOperation_t[], const int[],
                                 const int[], const int[], const void*, const void* const[], cudaDataType_t,
                                 const int[], const void* const[], cudaDataType_t, const int[], const void*,
                                 void* const[], cudaDataType_t, const int[], int, const int[], cublasComputeType_t);

// The launches since the last call, as a JSON list.
std::string take_launches();

}  // namespace harness
