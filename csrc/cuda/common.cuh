// Device helpers shared by the .cu files (torch-free): float conversion for fp32/fp16/bf16 storage types.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace dpar {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Calls body(T{}) with T the storage type of dtype (float, __half, __nv_bfloat16); an unknown dtype gives
// cudaErrorInvalidValue.
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::Float32: return body(float{});
    case DType::Float16: return body(__half{});
    case DType::BFloat16: return body(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace dpar
