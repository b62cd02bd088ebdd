// CUDA token_entropy: one warp (small vocabularies) or one 256-thread block per row. Each thread keeps an online
// state (m = max raw logit, s = sum e, w = sum t e with t = (z - m) * inv_t, e = exp(t)) over 16-byte vector loads
// (a scalar prologue reaches 16-byte alignment, a scalar tail finishes the row); the states are merged with warp
// shuffles and, across warps, through shared memory. Entropy = log s - w / s.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/entropy.h"

namespace dpar {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpRowVocab = 2048;  // vocabularies up to this size get one warp per row

struct State {
  float m, s, w;
};

// Merges two states; empty ones (m = -inf, s = 0) contribute nothing, a NaN s propagates (also from a state that
// has seen only NaN and -inf, whose m is still -inf).
__device__ __forceinline__ State merge(State a, State b, float inv_t) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return State{m, a.s + b.s, a.w + b.w};
  State r{m, 0.f, 0.f};
  if (a.s != 0.f) {
    const float d = (a.m - m) * inv_t, scale = __expf(d);
    r.s += scale * a.s;
    r.w += scale * (a.w + d * a.s);
  }
  if (b.s != 0.f) {
    const float d = (b.m - m) * inv_t, scale = __expf(d);
    r.s += scale * b.s;
    r.w += scale * (b.w + d * b.s);
  }
  return r;
}

// Adds K values to a thread's state: one rescale only when the maximum grows. fmaxf ignores NaN, so a NaN among
// values that raise no maximum (all NaN or -inf) is recorded as s = NaN; later values keep it NaN.
template <int K>
__device__ __forceinline__ void accumulate(State& st, const float (&x)[K], float inv_t) {
  float block_max = x[0];
  bool nan = x[0] != x[0];
#pragma unroll
  for (int i = 1; i < K; ++i) {
    block_max = fmaxf(block_max, x[i]);
    nan |= x[i] != x[i];
  }
  if (block_max > st.m) {
    if (st.s != 0.f) {
      const float d = (st.m - block_max) * inv_t, scale = __expf(d);
      st.w = scale * (st.w + d * st.s);
      st.s *= scale;
    }
    st.m = block_max;
  }
  if (st.m == -INFINITY) {  // only -inf (and NaN) so far
    if (nan) st.s = NAN;
    return;
  }
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float t = (x[i] - st.m) * inv_t, e = __expf(t);
    st.s += e;
    st.w += e > 0.f ? t * e : 0.f;  // -inf logit: t = -inf, e = 0
  }
}

template <typename T>
struct Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  __device__ __forceinline__ static void load(const T* p, float (&x)[kSize]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kSize; ++i) x[i] = to_float(v[i]);
  }
};

__device__ __forceinline__ State warp_merge(State st, float inv_t) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const State other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                      __shfl_xor_sync(0xffffffffu, st.w, offset)};
    st = merge(st, other, inv_t);
  }
  return st;
}

// WARPS_PER_ROW warps share a row; a block of kThreads threads covers kWarps / WARPS_PER_ROW rows.
template <typename T, int WARPS_PER_ROW>
__global__ void __launch_bounds__(kThreads) token_entropy_kernel(const T* __restrict__ logits, float* __restrict__ out,
                                                                 int64_t rows, int64_t vocab, int64_t row_stride,
                                                                 float inv_t) {
  constexpr int kRowThreads = WARPS_PER_ROW * 32;
  constexpr int kVec = Vec16<T>::kSize;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_in_block = warp / WARPS_PER_ROW;
  const int tid = threadIdx.x % kRowThreads;
  const int64_t row = int64_t(blockIdx.x) * (kWarps / WARPS_PER_ROW) + row_in_block;
  __shared__ State partial[kWarps];

  State st{-INFINITY, 0.f, 0.f};
  if (row < rows) {
    const T* p = logits + row * row_stride;
    const int64_t misaligned = (reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T);
    const int64_t to_alignment = misaligned == 0 ? 0 : kVec - misaligned;
    const int64_t head = to_alignment < vocab ? to_alignment : vocab;
    const int64_t body = (vocab - head) / kVec;
    for (int64_t i = tid; i < head; i += kRowThreads) {
      const float x[1] = {to_float(p[i])};
      accumulate(st, x, inv_t);
    }
    const T* aligned = p + head;
    for (int64_t v = tid; v < body; v += kRowThreads) {
      float x[kVec];
      Vec16<T>::load(aligned + v * kVec, x);
      accumulate(st, x, inv_t);
    }
    for (int64_t i = head + body * kVec + tid; i < vocab; i += kRowThreads) {
      const float x[1] = {to_float(p[i])};
      accumulate(st, x, inv_t);
    }
  }
  st = warp_merge(st, inv_t);
  if (WARPS_PER_ROW > 1) {
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (tid >= 32) return;
    st = lane < WARPS_PER_ROW ? partial[row_in_block * WARPS_PER_ROW + lane] : State{-INFINITY, 0.f, 0.f};
    st = warp_merge(st, inv_t);
  }
  if (tid == 0 && row < rows) out[row] = st.s == 0.f ? NAN : __logf(st.s) - st.w / st.s;
}

#if !defined(DPAR_ENTROPY_HOST_EMULATION)  // tests/cuda_host/entropy_emulation.cpp launches the kernel itself
template <typename T, int WARPS_PER_ROW>
cudaError_t launch(const T* logits, float* out, int64_t rows, int64_t vocab, int64_t row_stride, float inv_t,
                   cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kWarps / WARPS_PER_ROW;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  token_entropy_kernel<T, WARPS_PER_ROW>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(logits, out, rows, vocab, row_stride, inv_t);
  return cudaGetLastError();
}
#endif

}  // namespace

#if !defined(DPAR_ENTROPY_HOST_EMULATION)
cudaError_t launch_token_entropy(const void* logits, float* out, int64_t rows, int64_t vocab, int64_t row_stride,
                                 float inv_temperature, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (vocab <= 0 || !(inv_temperature > 0.f)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits);
    return vocab <= kWarpRowVocab ? launch<T, 1>(x, out, rows, vocab, row_stride, inv_temperature, stream)
                                  : launch<T, kWarps>(x, out, rows, vocab, row_stride, inv_temperature, stream);
  });
}
#endif

}  // namespace dpar
