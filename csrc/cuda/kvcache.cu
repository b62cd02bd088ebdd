// GPU kernels of the KV-cache attention (see kvcache.h): write the new keys, split-KV partial attention (one warp
// per query row and split, online softmax in fp32, base-2 exponentials), merge of the splits by their lse.
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/kvcache.h"

namespace dpar {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxSplits = 16;
constexpr int kMinSplitKeys = 128;
constexpr float kLog2e = 1.4426950408889634f;

struct Args {
  KVCacheShape shape;
  const void* q;
  void* k_cache;
  void* v_cache;
  const void* k_new;
  const void* v_new;
  void* out;
  CacheStrides q_s, kc_s, vc_s, kn_s, vn_s, out_s;
  const int32_t* cache_seqlens;
  float* part_out;
  float* part_lse;
  int splits, split_size;
};

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

__device__ __forceinline__ int cached_length(const Args& a, int b) {
  return clamp_int(a.cache_seqlens[b], 0, a.shape.max_keys);
}

// Keys seen by query i of row b.
__device__ __forceinline__ int visible_end(const Args& a, int b, int i) {
  const KVCacheShape& s = a.shape;
  const long long total = static_cast<long long>(cached_length(a, b)) + (a.k_new != nullptr ? s.seqlen_q : 0);
  const long long end = s.causal ? total - s.seqlen_q + 1 + i : total;
  return static_cast<int>(end < 0 ? 0 : (end > s.max_keys ? s.max_keys : end));
}

template <typename T>
__global__ void write_kernel(Args a) {
  const int row = blockIdx.x, h = blockIdx.y;  // row = b * seqlen_q + i
  const int b = row / a.shape.seqlen_q, i = row % a.shape.seqlen_q;
  const int position = cached_length(a, b) + i;
  if (position >= a.shape.max_keys) return;  // past the cache: dropped
  const T* k = static_cast<const T*>(a.k_new) + b * a.kn_s.batch + i * a.kn_s.position + h * a.kn_s.head;
  const T* v = static_cast<const T*>(a.v_new) + b * a.vn_s.batch + i * a.vn_s.position + h * a.vn_s.head;
  T* kc = static_cast<T*>(a.k_cache) + b * a.kc_s.batch + position * a.kc_s.position + h * a.kc_s.head;
  T* vc = static_cast<T*>(a.v_cache) + b * a.vc_s.batch + position * a.vc_s.position + h * a.vc_s.head;
  for (int c = threadIdx.x; c < a.shape.head_dim; c += blockDim.x) {
    kc[c] = k[c];
    vc[c] = v[c];
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The query row of this warp: flat = (b * seqlen_q + i) * heads_q + head, rows = all of them.
struct QueryRow {
  long long flat, rows;
  int b, i, head;
};

__device__ __forceinline__ QueryRow query_row(const Args& a) {
  const KVCacheShape& s = a.shape;
  QueryRow r;
  r.flat = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  r.rows = static_cast<long long>(s.batch) * s.seqlen_q * s.heads_q;
  r.head = static_cast<int>(r.flat % s.heads_q);
  r.i = static_cast<int>((r.flat / s.heads_q) % s.seqlen_q);
  r.b = static_cast<int>(r.flat / (static_cast<long long>(s.heads_q) * s.seqlen_q));
  return r;
}

// One warp per (flat query row, split); lane c holds dims c, c + 32, ... (kPerLane of them).
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) partial_kernel(Args a) {
  const KVCacheShape& s = a.shape;
  const int lane = threadIdx.x % kWarp;
  const QueryRow row = query_row(a);
  if (row.flat >= row.rows) return;
  const long long flat = row.flat, rows = row.rows;
  const int split = blockIdx.y, head = row.head, i = row.i, b = row.b;
  const int kv_head = head / (s.heads_q / s.heads_kv);
  const int lo = split * a.split_size;
  const int end = visible_end(a, b, i);
  const int hi = end < lo + a.split_size ? end : lo + a.split_size;

  const T* q = static_cast<const T*>(a.q) + b * a.q_s.batch + i * a.q_s.position + head * a.q_s.head;
  const T* k = static_cast<const T*>(a.k_cache) + b * a.kc_s.batch + kv_head * a.kc_s.head;
  const T* v = static_cast<const T*>(a.v_cache) + b * a.vc_s.batch + kv_head * a.vc_s.head;
  const float scale = s.softmax_scale * kLog2e;
  float qr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int c = lane + e * kWarp;
    qr[e] = c < s.head_dim ? to_float(q[c]) * scale : 0.f;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int key = lo; key < hi; ++key) {
    const T* kr = k + key * a.kc_s.position;
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int c = lane + e * kWarp;
      if (c < s.head_dim) dot += qr[e] * to_float(kr[c]);
    }
    const float score = warp_sum(dot);
    const float m_new = fmaxf(m, score);
    const float alpha = exp2f(m - m_new);  // 0 on the first key (m = -inf)
    const float p = exp2f(score - m_new);
    l = l * alpha + p;
    const T* vr = v + key * a.vc_s.position;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int c = lane + e * kWarp;
      acc[e] = acc[e] * alpha + (c < s.head_dim ? p * to_float(vr[c]) : 0.f);
    }
    m = m_new;
  }
  const bool sees = l > 0.f;
  const float inv = sees ? 1.f / l : 0.f;
  float* po = a.part_out + (static_cast<long long>(split) * rows + flat) * s.head_dim;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int c = lane + e * kWarp;
    if (c < s.head_dim) po[c] = acc[e] * inv;
  }
  if (lane == 0) a.part_lse[static_cast<long long>(split) * rows + flat] = sees ? m + log2f(l) : -INFINITY;
}

// One warp per flat query row: weights 2^(lse_s - max) over the splits.
template <typename T>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock) merge_kernel(Args a) {
  const KVCacheShape& s = a.shape;
  const int lane = threadIdx.x % kWarp;
  const QueryRow row = query_row(a);
  if (row.flat >= row.rows) return;
  const long long flat = row.flat, rows = row.rows;
  const int head = row.head, i = row.i, b = row.b;
  float top = -INFINITY;
  for (int split = 0; split < a.splits; ++split) top = fmaxf(top, a.part_lse[split * rows + flat]);
  float total = 0.f;
  for (int split = 0; split < a.splits; ++split) {
    const float lse = a.part_lse[split * rows + flat];
    total += lse == -INFINITY ? 0.f : exp2f(lse - top);
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(a.out) + b * a.out_s.batch + i * a.out_s.position + head * a.out_s.head;
  for (int c = lane; c < s.head_dim; c += kWarp) {
    float value = 0.f;
    for (int split = 0; split < a.splits; ++split) {
      const float lse = a.part_lse[split * rows + flat];
      if (lse != -INFINITY) value += exp2f(lse - top) * a.part_out[(split * rows + flat) * s.head_dim + c];
    }
    out[c] = from_float<T>(value * inv);
  }
}

template <typename T, int kPerLane>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  const KVCacheShape& s = a.shape;
  if (a.k_new != nullptr && s.batch > 0 && s.seqlen_q > 0 && s.heads_kv > 0) {
    write_kernel<T><<<dim3(s.batch * s.seqlen_q, s.heads_kv), kWarp, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const long long rows = static_cast<long long>(s.batch) * s.seqlen_q * s.heads_q;
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  partial_kernel<T, kPerLane><<<dim3(blocks, a.splits), kWarp * kWarpsPerBlock, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  merge_kernel<T><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

int kvcache_attention_splits(int max_keys) {
  const int size = kvcache_attention_split_size(max_keys);
  return max_keys <= 0 ? 1 : (max_keys + size - 1) / size;
}

int kvcache_attention_split_size(int max_keys) {
  const int even = (max_keys + kMaxSplits - 1) / kMaxSplits;
  return even > kMinSplitKeys ? even : kMinSplitKeys;
}

cudaError_t kvcache_attention_forward(const KVCacheShape& shape, const void* q, CacheStrides q_strides, void* k_cache,
                                      CacheStrides k_cache_strides, void* v_cache, CacheStrides v_cache_strides,
                                      const int32_t* cache_seqlens, const void* k_new, CacheStrides k_new_strides,
                                      const void* v_new, CacheStrides v_new_strides, void* out,
                                      CacheStrides out_strides, float* workspace_out, float* workspace_lse,
                                      cudaStream_t stream) {
  if (shape.head_dim < 1 || shape.head_dim > kKVCacheMaxHeadDim || shape.heads_kv < 1 ||
      shape.heads_q % shape.heads_kv != 0 || (k_new == nullptr) != (v_new == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const Args a{shape, q, k_cache, v_cache, k_new, v_new, out, q_strides, k_cache_strides, v_cache_strides,
               k_new_strides, v_new_strides, out_strides, cache_seqlens, workspace_out, workspace_lse,
               kvcache_attention_splits(shape.max_keys), kvcache_attention_split_size(shape.max_keys)};
  return dispatch_dtype(shape.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (shape.head_dim <= 32) return launch<T, 1>(a, stream);
    if (shape.head_dim <= 64) return launch<T, 2>(a, stream);
    if (shape.head_dim <= 128) return launch<T, 4>(a, stream);
    return launch<T, 8>(a, stream);
  });
}

}  // namespace dpar
