// CUDA patch gather (max / sum / mean over each patch's tokens) and patch spread (patch row -> its token rows).
// One block per (patch, column tile); each thread owns VEC adjacent columns (16-byte loads when aligned) and loops
// over the patch's tokens, accumulating in fp32. Every output element has exactly one writer: no atomics.
#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/gather_scatter.h"

namespace dpar {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxGridY = 65535;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* ptr, const float (&values)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(values[k]);
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

// The block's patch [start, stop); false when the offsets are out of range (the caller validates them, this only
// keeps a bad call from touching memory it does not own).
__device__ __forceinline__ bool patch_range(const int32_t* cu, int64_t total, int64_t& start, int64_t& stop) {
  start = cu[blockIdx.x];
  stop = cu[blockIdx.x + 1];
  return 0 <= start && start <= stop && stop <= total;
}

// First column of this thread, or -1 when the thread is past the end (cols is a multiple of VEC).
template <int VEC>
__device__ __forceinline__ int64_t thread_column(int64_t cols) {
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  return col < cols ? col : -1;
}

template <typename T, int VEC, GatherReduce REDUCE>
__global__ void __launch_bounds__(kMaxThreads)
    gather_kernel(const T* __restrict__ x, int64_t x_row_stride, const int32_t* __restrict__ cu, int64_t total,
                  int64_t cols, T* __restrict__ out, int32_t* __restrict__ argmax) {
  const int64_t col = thread_column<VEC>(cols);
  int64_t start, stop;
  if (col < 0 || !patch_range(cu, total, start, stop)) return;
  const int64_t out_offset = static_cast<int64_t>(blockIdx.x) * cols + col;
  float acc[VEC];
  if (start == stop) {  // empty patch: 0 for every reduction, no arg-max
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
    store_floats<T, VEC>(out + out_offset, acc);
    if (REDUCE == GatherReduce::Max && argmax != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) argmax[out_offset + k] = -1;
    }
    return;
  }
  const T* row = x + start * x_row_stride + col;
  load_floats<T, VEC>(row, acc);
  if (REDUCE == GatherReduce::Max) {
    int32_t arg[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) arg[k] = static_cast<int32_t>(start);
#pragma unroll 4
    for (int64_t t = start + 1; t < stop; ++t) {
      row += x_row_stride;
      float v[VEC];
      load_floats<T, VEC>(row, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (v[k] > acc[k] || isnan(v[k])) {  // strict: ties keep the first token; NaN propagates
          acc[k] = v[k];
          arg[k] = static_cast<int32_t>(t);
        }
      }
    }
    if (argmax != nullptr) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) argmax[out_offset + k] = isnan(acc[k]) ? -1 : arg[k];  // as the reference
    }
  } else {
#pragma unroll 4
    for (int64_t t = start + 1; t < stop; ++t) {
      row += x_row_stride;
      float v[VEC];
      load_floats<T, VEC>(row, v);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += v[k];
    }
    if (REDUCE == GatherReduce::Mean) {
      const float length = static_cast<float>(stop - start);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] /= length;
    }
  }
  store_floats<T, VEC>(out + out_offset, acc);
}

template <typename T, int VEC, SpreadMode MODE>
__global__ void __launch_bounds__(kMaxThreads)
    spread_kernel(const T* __restrict__ src, int64_t src_row_stride, const int32_t* __restrict__ cu,
                  const int32_t* __restrict__ argmax, int64_t total, int64_t cols, T* __restrict__ out) {
  const int64_t col = thread_column<VEC>(cols);
  int64_t start, stop;
  if (col < 0 || !patch_range(cu, total, start, stop) || start == stop) return;
  float values[VEC];
  load_floats<T, VEC>(src + static_cast<int64_t>(blockIdx.x) * src_row_stride + col, values);
  if (MODE == SpreadMode::Mean) {
    const float length = static_cast<float>(stop - start);
#pragma unroll
    for (int k = 0; k < VEC; ++k) values[k] /= length;
  }
  int32_t arg[VEC];
  if (MODE == SpreadMode::ArgmaxRoute) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) arg[k] = argmax[static_cast<int64_t>(blockIdx.x) * cols + col + k];
  }
  T* dst = out + start * cols + col;
  for (int64_t t = start; t < stop; ++t, dst += cols) {
    if (MODE == SpreadMode::ArgmaxRoute) {
      float routed[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) routed[k] = arg[k] == t ? values[k] : 0.f;
      store_floats<T, VEC>(dst, routed);
    } else {
      store_floats<T, VEC>(dst, values);
    }
  }
}

// 16-byte vectors when every row start is 16-byte aligned, else one element per thread.
template <typename T>
int vector_width(const void* src, int64_t src_row_stride, const void* dst, int64_t cols) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = cols % kVec == 0 && src_row_stride % kVec == 0 &&
                       reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  return aligned ? kVec : 1;
}

struct LaunchShape {
  dim3 grid;
  dim3 block;
  bool valid;
};

LaunchShape launch_shape(int64_t num_patches, int64_t cols, int vec) {
  const int64_t vectors = (cols + vec - 1) / vec;
  const int64_t threads = std::min<int64_t>(kMaxThreads, (vectors + 31) / 32 * 32);
  const int64_t tiles = (vectors + threads - 1) / threads;
  LaunchShape shape;
  shape.grid = dim3(static_cast<unsigned>(num_patches), static_cast<unsigned>(tiles));
  shape.block = dim3(static_cast<unsigned>(threads));
  shape.valid = tiles <= kMaxGridY && num_patches <= INT32_MAX;
  return shape;
}

template <typename T, int VEC>
cudaError_t gather_with(const void* x, int64_t x_row_stride, const int32_t* cu, int64_t num_patches, int64_t total,
                        int64_t cols, GatherReduce reduce, void* out, int32_t* argmax, cudaStream_t stream) {
  const LaunchShape shape = launch_shape(num_patches, cols, VEC);
  if (!shape.valid) return cudaErrorInvalidConfiguration;
  const T* xs = static_cast<const T*>(x);
  T* os = static_cast<T*>(out);
  switch (reduce) {
    case GatherReduce::Max:
      gather_kernel<T, VEC, GatherReduce::Max><<<shape.grid, shape.block, 0, stream>>>(xs, x_row_stride, cu, total,
                                                                                         cols, os, argmax);
      break;
    case GatherReduce::Sum:
      gather_kernel<T, VEC, GatherReduce::Sum><<<shape.grid, shape.block, 0, stream>>>(xs, x_row_stride, cu, total,
                                                                                         cols, os, argmax);
      break;
    case GatherReduce::Mean:
      gather_kernel<T, VEC, GatherReduce::Mean><<<shape.grid, shape.block, 0, stream>>>(xs, x_row_stride, cu,
                                                                                          total, cols, os, argmax);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t spread_with(const void* src, int64_t src_row_stride, const int32_t* cu, const int32_t* argmax,
                        int64_t num_patches, int64_t total, int64_t cols, SpreadMode mode, void* out,
                        cudaStream_t stream) {
  const LaunchShape shape = launch_shape(num_patches, cols, VEC);
  if (!shape.valid) return cudaErrorInvalidConfiguration;
  const T* ss = static_cast<const T*>(src);
  T* os = static_cast<T*>(out);
  switch (mode) {
    case SpreadMode::Copy:
      spread_kernel<T, VEC, SpreadMode::Copy><<<shape.grid, shape.block, 0, stream>>>(ss, src_row_stride, cu, argmax,
                                                                                        total, cols, os);
      break;
    case SpreadMode::Mean:
      spread_kernel<T, VEC, SpreadMode::Mean><<<shape.grid, shape.block, 0, stream>>>(ss, src_row_stride, cu, argmax,
                                                                                        total, cols, os);
      break;
    case SpreadMode::ArgmaxRoute:
      spread_kernel<T, VEC, SpreadMode::ArgmaxRoute><<<shape.grid, shape.block, 0, stream>>>(
          ss, src_row_stride, cu, argmax, total, cols, os);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_patch_gather(const void* x, int64_t x_row_stride, const int32_t* cu_tokens, int64_t num_patches,
                                int64_t total, int64_t cols, GatherReduce reduce, void* out, int32_t* argmax,
                                DType dtype, cudaStream_t stream) {
  if (num_patches == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    if (vector_width<T>(x, x_row_stride, out, cols) == kVec) {
      return gather_with<T, kVec>(x, x_row_stride, cu_tokens, num_patches, total, cols, reduce, out, argmax, stream);
    }
    return gather_with<T, 1>(x, x_row_stride, cu_tokens, num_patches, total, cols, reduce, out, argmax, stream);
  });
}

cudaError_t launch_patch_spread(const void* src, int64_t src_row_stride, const int32_t* cu_tokens,
                                const int32_t* argmax, int64_t num_patches, int64_t total, int64_t cols,
                                SpreadMode mode, void* out, DType dtype, cudaStream_t stream) {
  if (num_patches == 0 || total == 0 || cols == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    if (vector_width<T>(src, src_row_stride, out, cols) == kVec) {
      return spread_with<T, kVec>(src, src_row_stride, cu_tokens, argmax, num_patches, total, cols, mode, out,
                                  stream);
    }
    return spread_with<T, 1>(src, src_row_stride, cu_tokens, argmax, num_patches, total, cols, mode, out, stream);
  });
}

}  // namespace dpar
