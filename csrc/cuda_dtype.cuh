// The element types of the CUDA kernels, and the one dtype switch their host entries share.
// No torch headers.
#pragma once

#ifdef __CUDACC__  // g++ builds the kernels' CPU emulation (tests/cuda_emu), whose shim
#include <cuda_bf16.h>  // provides the same names
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "rotary_cuda.h"  // DType

namespace yarn {

// Calls launch(T{}) with T the CUDA element type of `dtype` (float, __half, __nv_bfloat16),
// then returns the launch's cudaError_t as an int (0 = ok; -1 for an unknown dtype).
template <typename Launch>
int launch_for_dtype(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace yarn
