// Helpers for the torch bindings of the CUDA launchers (compiled only when torch has CUDA).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/common.h"

namespace dpar {

inline DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "dpar CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace dpar
