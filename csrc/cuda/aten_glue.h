// What the CUDA launchers (csrc/cuda/*.cu) translate from ATen for the ATen-free kernel headers of
// csrc/include/dfa_kernels/cuda/: dtypes and the current device's numbers.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/ScalarType.h>
#include <library_types.h>

#include "dfa_kernels/cuda/common.cuh"
#include "dfa_kernels/cuda/plan.h"

namespace dfa_kernels {

// The dtype must be float32, float16 or bfloat16 (the callers' checks ensure it).
inline FpKind fp_kind(c10::ScalarType t) {
  return t == c10::kFloat ? FpKind::F32 : (t == c10::kHalf ? FpKind::F16 : FpKind::BF16);
}

inline cudaDataType_t cuda_type(c10::ScalarType t) {
  return t == c10::kFloat ? CUDA_R_32F : (t == c10::kHalf ? CUDA_R_16F : CUDA_R_16BF);
}

inline DeviceCaps device_caps() {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  return {props->multiProcessorCount, props->major};
}

}  // namespace dfa_kernels
