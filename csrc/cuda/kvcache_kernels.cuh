// Kernels of the KV-cache attention (see kvcache.h), flash-decoding style. Included by kvcache_units.cuh (the GPU
// launches), and by tests/csrc/cuda_host/kvcache_emulation.cpp, which runs the same code on host fibers
// (DPAR_KVCACHE_HOST_EMULATION) to check it against dpar_kernels/kvcache/naive.py.
//
// attend_kernel: CTA (unit, split) with unit = (b, kv head, row block) owns up to kRows query rows r = g * Sq + i
// (query i of query head kv_head * group + g), so every key and value tile of the kv head is loaded into shared
// memory once for all the GQA heads of the group. Tiles of kN keys are copied with 16-byte cp.async vectors, two
// stages deep (a scalar path serves caches whose rows are not 16-byte aligned); scores are computed with the keys
// spread across the lanes (thread -> one key, several rows), the online softmax keeps fp32 statistics in the log2
// domain (one warp per row), and the P V product gives each thread 8 output dims of a few rows. Keys at positions
// [cached, cached + Sq) are read from k_new/v_new themselves, so the CTAs of split 0, row block 0 write them into the
// cache in the same launch with no ordering between CTAs. With one split the output is written directly; otherwise
// each split writes its normalised partial output and lse and merge_kernel combines them (log-sum-exp weights).
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kvcache.h"

namespace dpar {
namespace kvcache {

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kRows = 16;          // query rows per CTA
constexpr int kChunk = 8;          // output dims per thread in the P V product
constexpr int kTileBytes = 8192;   // target size of one key (or value) tile in shared memory
constexpr int kStages = 2;         // tiles in flight per CTA
constexpr int kMinBlocksPerSm = 4;  // register budget: 128 per thread
constexpr int kDefaultSmemBytes = 48 * 1024;  // above this a kernel must opt in
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

constexpr int clamp_constant(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Tile sizes, thread mappings and the shared-memory layout (byte offsets) for storage type T and padded head dim kD.
template <typename T, int kD>
struct TilePlan {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte vector
  static constexpr int kN = clamp_constant(kTileBytes / (kD * static_cast<int>(sizeof(T))), 16, 64);  // keys/tile
  static constexpr int kLd = kD + kVec;  // row pitch: 16-byte rows, 8 consecutive rows on distinct bank groups
  static constexpr int kKeyGroups = kThreads / kN;  // scores: thread t -> key t % kN, rows t / kN + j * kKeyGroups
  static constexpr int kScoreRows = kRows / kKeyGroups;
  static constexpr int kChunks = kD / kChunk;  // P V: thread t -> dims (t % kChunks) * 8 + [0, 8),
  static constexpr int kRowGroups = kThreads / kChunks;  //  rows t / kChunks + j * kRowGroups
  static constexpr int kOutRows = (kRows + kRowGroups - 1) / kRowGroups;
  static constexpr int kTileElems = kN * kLd;
  static constexpr int kKV = 0;  // T [kStages][2 (k, v)][kN][kLd]
  static constexpr int kQ = kKV + kStages * 2 * kTileElems * static_cast<int>(sizeof(T));  // float [kRows][kD]
  static constexpr int kS = kQ + kRows * kD * 4;         // float [kRows][kN]: scores, then probabilities
  static constexpr int kRowMax = kS + kRows * kN * 4;    // float [kRows]: running max (log2 domain)
  static constexpr int kRowSum = kRowMax + kRows * 4;    // float [kRows]: running sum
  static constexpr int kRowScale = kRowSum + kRows * 4;  // float [kRows]: this tile's rescale of the output
  static constexpr int kEnds = kRowScale + kRows * 4;    // int [kRows]: keys each row sees
  static constexpr int kBytes = kEnds + kRows * 4;
  static_assert(kThreads % kN == 0 && kRows % kKeyGroups == 0 && kD % kChunk == 0 && kThreads % kChunks == 0,
                "thread mappings must tile the block");
  static_assert(kQ % 16 == 0 && kS % 16 == 0, "vector regions stay 16-byte aligned");
};

struct Args {
  KVCacheShape shape;
  const void* q;
  void* k_cache;
  void* v_cache;
  const void* k_new;  // null: nothing appended
  const void* v_new;
  void* out;
  CacheStrides q_s, kc_s, vc_s, kn_s, vn_s, out_s;
  const int32_t* cache_seqlens;
  float* part_out;  // [splits, rows, head_dim] (splits > 1 only)
  float* part_lse;  // [splits, rows]
  int splits, split_keys, row_blocks;
  bool vectorized;  // every key/value row of the caches and k_new/v_new starts 16-byte aligned, whole vectors
};

// ---------------------------------------------------------------------------------------------------------------
// Device helpers.

#if defined(DPAR_KVCACHE_HOST_EMULATION)
// Provided by the host emulation (tests/csrc/cuda_host/kvcache_emulation.cpp).
unsigned char* shared_bytes();
void copy_16_async(void* shared, const void* global, bool valid);
void copy_async_commit();
void copy_async_wait_all_but_newest();
#else
__device__ __forceinline__ unsigned char* shared_bytes() {
  extern __shared__ __align__(16) unsigned char dpar_kvcache_smem[];
  return dpar_kvcache_smem;
}

// 16 bytes global -> shared, asynchronous on sm_80+ (cp.async, L2 only); zero-filled when !valid (global unread).
__device__ __forceinline__ void copy_16_async(void* shared, const void* global, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid ? 16 : 0));
#else
  *static_cast<uint4*>(shared) = valid ? *static_cast<const uint4*>(global) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits for every committed group but the newest one.
__device__ __forceinline__ void copy_async_wait_all_but_newest() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}
#endif

template <typename P>
__device__ __forceinline__ P* region(int offset) {
  return reinterpret_cast<P*>(shared_bytes() + offset);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// 8 consecutive elements at a 16-byte aligned shared-memory address, as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&x)[kChunk]) {
  if constexpr (sizeof(T) == 2) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) x[k] = to_float(e[k]);
  } else {
    const float4 lo = reinterpret_cast<const float4*>(p)[0], hi = reinterpret_cast<const float4*>(p)[1];
    x[0] = lo.x, x[1] = lo.y, x[2] = lo.z, x[3] = lo.w, x[4] = hi.x, x[5] = hi.y, x[6] = hi.z, x[7] = hi.w;
  }
}

// Keys seen by query i of a row whose clamped cache length is `cached`.
__device__ __forceinline__ int visible_end(const KVCacheShape& s, int cached, bool appended, int i) {
  const long long total = static_cast<long long>(cached) + (appended ? s.seqlen_q : 0);
  const long long end = s.causal ? total - s.seqlen_q + 1 + i : total;
  return static_cast<int>(end < 0 ? 0 : (end > s.max_keys ? s.max_keys : end));
}

// Where the keys (or values) of one (b, kv head) live: cache rows below `cached`, new rows from there on.
template <typename T>
struct KeySource {
  const T* cache;
  const T* fresh;  // null without new keys
  int64_t cache_stride, fresh_stride;
  int cached, fresh_rows;

  // Row of key position `key` (0 <= key < max_keys); null where no row holds it (past the new keys).
  __device__ __forceinline__ const T* row(int key) const {
    if (key < cached) return cache + key * cache_stride;
    const int j = key - cached;
    return fresh != nullptr && j < fresh_rows ? fresh + j * fresh_stride : nullptr;
  }
};

// Copies keys [n0, n0 + kN) of K and V into one stage (zeros past `hi`, past head_dim and where no row holds them).
template <typename T, int kD>
__device__ __forceinline__ void issue_tile(const Args& a, const KeySource<T>& ks, const KeySource<T>& vs, int n0,
                                           int hi, T* stage) {
  using P = TilePlan<T, kD>;
  const int head_dim = a.shape.head_dim;
  if (a.vectorized) {
    constexpr int kVecsPerRow = kD / P::kVec;
    for (int idx = threadIdx.x; idx < 2 * P::kN * kVecsPerRow; idx += kThreads) {
      const int which = idx / (P::kN * kVecsPerRow), rest = idx % (P::kN * kVecsPerRow);
      const int n = rest / kVecsPerRow, c = (rest % kVecsPerRow) * P::kVec;
      const int key = n0 + n;
      const T* row = key < hi && c < head_dim ? (which == 0 ? ks.row(key) : vs.row(key)) : nullptr;
      T* dst = stage + which * P::kTileElems + n * P::kLd + c;
      copy_16_async(dst, row != nullptr ? row + c : ks.cache, row != nullptr);
    }
  } else {
    for (int idx = threadIdx.x; idx < 2 * P::kN * kD; idx += kThreads) {
      const int which = idx / (P::kN * kD), rest = idx % (P::kN * kD);
      const int n = rest / kD, c = rest % kD;
      const int key = n0 + n;
      const T* row = key < hi && c < head_dim ? (which == 0 ? ks.row(key) : vs.row(key)) : nullptr;
      stage[which * P::kTileElems + n * P::kLd + c] = row != nullptr ? row[c] : from_float<T>(0.f);
    }
  }
}

// Writes the new keys and values of (b, kv head) at positions cached + j below max_keys.
template <typename T>
__device__ __forceinline__ void write_new_keys(const Args& a, int b, int kv_head, int cached) {
  const KVCacheShape& s = a.shape;
  const T* kn = static_cast<const T*>(a.k_new) + b * a.kn_s.batch + kv_head * a.kn_s.head;
  const T* vn = static_cast<const T*>(a.v_new) + b * a.vn_s.batch + kv_head * a.vn_s.head;
  T* kc = static_cast<T*>(a.k_cache) + b * a.kc_s.batch + kv_head * a.kc_s.head;
  T* vc = static_cast<T*>(a.v_cache) + b * a.vc_s.batch + kv_head * a.vc_s.head;
  const int rows = s.max_keys - cached < s.seqlen_q ? s.max_keys - cached : s.seqlen_q;
  for (long long idx = threadIdx.x; idx < static_cast<long long>(rows) * s.head_dim; idx += kThreads) {
    const int j = static_cast<int>(idx / s.head_dim), c = static_cast<int>(idx % s.head_dim);
    const int position = cached + j;
    kc[position * a.kc_s.position + c] = kn[j * a.kn_s.position + c];
    vc[position * a.vc_s.position + c] = vn[j * a.vn_s.position + c];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels.

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) attend_kernel(Args a) {
  using P = TilePlan<T, kD>;
  const KVCacheShape& s = a.shape;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int split = blockIdx.y;
  const long long unit = blockIdx.x;
  const int row_block = static_cast<int>(unit % a.row_blocks);
  const int kv_head = static_cast<int>((unit / a.row_blocks) % s.heads_kv);
  const int b = static_cast<int>(unit / a.row_blocks / s.heads_kv);
  const int group = s.heads_q / s.heads_kv;
  const int row0 = row_block * kRows;
  const int rows = group * s.seqlen_q - row0 < kRows ? group * s.seqlen_q - row0 : kRows;
  const bool appended = a.k_new != nullptr;
  const int cached = clamp_int(a.cache_seqlens[b], 0, s.max_keys);
  if (appended && split == 0 && row_block == 0) write_new_keys<T>(a, b, kv_head, cached);

  T* stages = region<T>(P::kKV);
  float* q_tile = region<float>(P::kQ);
  float* scores = region<float>(P::kS);
  float* row_max = region<float>(P::kRowMax);
  float* row_sum = region<float>(P::kRowSum);
  float* row_scale = region<float>(P::kRowScale);
  int* ends = region<int>(P::kEnds);

  // Query rows, pre-scaled into the log2 domain; zero past head_dim and past the valid rows.
  const float scale = s.softmax_scale * kLog2e;
  for (int idx = tid; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD, c = idx % kD;
    float value = 0.f;
    if (r < rows && c < s.head_dim) {
      const int g = (row0 + r) / s.seqlen_q, i = (row0 + r) % s.seqlen_q;
      const T* q = static_cast<const T*>(a.q) + b * a.q_s.batch + i * a.q_s.position +
                   (kv_head * group + g) * a.q_s.head;
      value = to_float(q[c]) * scale;
    }
    q_tile[idx] = value;
  }
  if (tid < kRows) {
    ends[tid] = tid < rows ? visible_end(s, cached, appended, (row0 + tid) % s.seqlen_q) : 0;
    row_max[tid] = kNegInf;
    row_sum[tid] = 0.f;
  }
  __syncthreads();
  int block_end = 0;
  for (int r = 0; r < kRows; ++r) block_end = ends[r] > block_end ? ends[r] : block_end;
  const long long first = static_cast<long long>(split) * a.split_keys;
  const int lo = first < block_end ? static_cast<int>(first) : block_end;
  const int hi = first + a.split_keys < block_end ? static_cast<int>(first + a.split_keys) : block_end;
  const int tiles = (hi - lo + P::kN - 1) / P::kN;

  const KeySource<T> ks{static_cast<const T*>(a.k_cache) + b * a.kc_s.batch + kv_head * a.kc_s.head,
                        appended ? static_cast<const T*>(a.k_new) + b * a.kn_s.batch + kv_head * a.kn_s.head
                                 : nullptr,
                        a.kc_s.position, a.kn_s.position, cached, s.seqlen_q};
  const KeySource<T> vs{static_cast<const T*>(a.v_cache) + b * a.vc_s.batch + kv_head * a.vc_s.head,
                        appended ? static_cast<const T*>(a.v_new) + b * a.vn_s.batch + kv_head * a.vn_s.head
                                 : nullptr,
                        a.vc_s.position, a.vn_s.position, cached, s.seqlen_q};

  const int key_lane = tid % P::kN, key_group = tid / P::kN;     // score mapping
  const int chunk0 = (tid % P::kChunks) * kChunk, out_group = tid / P::kChunks;  // P V mapping
  float acc[P::kOutRows][kChunk];
#pragma unroll
  for (int j = 0; j < P::kOutRows; ++j) {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) acc[j][e] = 0.f;
  }

  if (tiles > 0) issue_tile<T, kD>(a, ks, vs, lo, hi, stages);
  copy_async_commit();
  for (int t = 0; t < tiles; ++t) {
    const int n0 = lo + t * P::kN;
    if (t + 1 < tiles) issue_tile<T, kD>(a, ks, vs, n0 + P::kN, hi, stages + ((t + 1) % kStages) * 2 * P::kTileElems);
    copy_async_commit();
    copy_async_wait_all_but_newest();
    __syncthreads();
    const T* k_tile = stages + (t % kStages) * 2 * P::kTileElems;
    const T* v_tile = k_tile + P::kTileElems;

    // Scores: this thread's key against kScoreRows rows.
    {
      float dot[P::kScoreRows];
#pragma unroll
      for (int j = 0; j < P::kScoreRows; ++j) dot[j] = 0.f;
#pragma unroll 4
      for (int c = 0; c < kD; c += kChunk) {
        float k8[kChunk];
        load8(k_tile + key_lane * P::kLd + c, k8);
#pragma unroll
        for (int j = 0; j < P::kScoreRows; ++j) {
          const int r = key_group + j * P::kKeyGroups;
          if (r < rows) {
            const float4 qa = *reinterpret_cast<const float4*>(q_tile + r * kD + c);
            const float4 qb = *reinterpret_cast<const float4*>(q_tile + r * kD + c + 4);
            float d = dot[j];
            d = fmaf(qa.x, k8[0], d), d = fmaf(qa.y, k8[1], d), d = fmaf(qa.z, k8[2], d), d = fmaf(qa.w, k8[3], d);
            d = fmaf(qb.x, k8[4], d), d = fmaf(qb.y, k8[5], d), d = fmaf(qb.z, k8[6], d), d = fmaf(qb.w, k8[7], d);
            dot[j] = d;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < P::kScoreRows; ++j) {
        const int r = key_group + j * P::kKeyGroups;
        if (r < rows) scores[r * P::kN + key_lane] = n0 + key_lane < ends[r] ? dot[j] : kNegInf;
      }
    }
    __syncthreads();

    // Online softmax: one warp per row; scores become probabilities, row_scale the rescale of the output so far.
    for (int r = warp; r < rows; r += kWarps) {
      float* row = scores + r * P::kN;
      const float x0 = lane < P::kN ? row[lane] : kNegInf;
      const float x1 = lane + kWarp < P::kN ? row[lane + kWarp] : kNegInf;
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(x0, x1)));
      const float base = m_new == kNegInf ? 0.f : m_new;  // no key yet: every exponential is 0
      const float alpha = exp2f(m_old - base);
      const float p0 = exp2f(x0 - base), p1 = exp2f(x1 - base);
      const float sum = warp_sum(p0 + p1);  // every lane has read row_max before lane 0 writes it below
      if (lane < P::kN) row[lane] = p0;
      if (lane + kWarp < P::kN) row[lane + kWarp] = p1;
      if (lane == 0) {
        row_max[r] = m_new;
        row_sum[r] = row_sum[r] * alpha + sum;
        row_scale[r] = alpha;
      }
    }
    __syncthreads();

    // out = out * alpha + P V: 8 dims of kOutRows rows per thread, one 16-byte value vector per key.
    if (out_group < kRows) {
#pragma unroll
      for (int j = 0; j < P::kOutRows; ++j) {
        const int r = out_group + j * P::kRowGroups;
        const float alpha = r < rows ? row_scale[r] : 0.f;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) acc[j][e] *= alpha;
      }
#pragma unroll 4
      for (int n = 0; n < P::kN; ++n) {
        float v8[kChunk];
        load8(v_tile + n * P::kLd + chunk0, v8);
#pragma unroll
        for (int j = 0; j < P::kOutRows; ++j) {
          const int r = out_group + j * P::kRowGroups;
          if (r < rows) {
            const float p = scores[r * P::kN + n];
#pragma unroll
            for (int e = 0; e < kChunk; ++e) acc[j][e] = fmaf(p, v8[e], acc[j][e]);
          }
        }
      }
    }
    __syncthreads();  // the stage and the scores are overwritten next
  }

  // Output (one split) or the normalised partial output and its lse (log2) for merge_kernel.
  const long long flat_rows = static_cast<long long>(s.batch) * s.seqlen_q * s.heads_q;
  auto flat_row = [&](int r) {
    const int g = (row0 + r) / s.seqlen_q, i = (row0 + r) % s.seqlen_q;
    return (static_cast<long long>(b) * s.seqlen_q + i) * s.heads_q + kv_head * group + g;
  };
  if (out_group < kRows) {
#pragma unroll
    for (int j = 0; j < P::kOutRows; ++j) {
      const int r = out_group + j * P::kRowGroups;
      if (r >= rows) continue;
      const float l = row_sum[r];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      if (a.splits == 1) {
        const int g = (row0 + r) / s.seqlen_q, i = (row0 + r) % s.seqlen_q;
        T* o = static_cast<T*>(a.out) + b * a.out_s.batch + i * a.out_s.position + (kv_head * group + g) * a.out_s.head;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if (chunk0 + e < s.head_dim) o[chunk0 + e] = from_float<T>(acc[j][e] * inv);
        }
      } else {
        float* po = a.part_out + (split * flat_rows + flat_row(r)) * s.head_dim;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) {
          if (chunk0 + e < s.head_dim) po[chunk0 + e] = acc[j][e] * inv;
        }
      }
    }
  }
  if (a.splits > 1 && tid < rows) {
    const float l = row_sum[tid];
    a.part_lse[split * flat_rows + flat_row(tid)] = l > 0.f ? row_max[tid] + log2f(l) : kNegInf;
  }
}

// One warp per flat query row: lane s holds split s's lse; out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(Args a) {
  const KVCacheShape& s = a.shape;
  const int lane = threadIdx.x % kWarp;
  const long long rows = static_cast<long long>(s.batch) * s.seqlen_q * s.heads_q;
  const long long flat = static_cast<long long>(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (flat >= rows) return;
  const float lse = lane < a.splits ? a.part_lse[lane * rows + flat] : kNegInf;
  const float top = warp_max(lse);
  const float weight = lse == kNegInf ? 0.f : exp2f(lse - top);
  const float total = warp_sum(weight);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const int head = static_cast<int>(flat % s.heads_q);
  const int i = static_cast<int>((flat / s.heads_q) % s.seqlen_q);
  const int b = static_cast<int>(flat / (static_cast<long long>(s.heads_q) * s.seqlen_q));
  T* out = static_cast<T*>(a.out) + b * a.out_s.batch + i * a.out_s.position + head * a.out_s.head;
  for (int c0 = 0; c0 < s.head_dim; c0 += kWarp) {  // uniform trip count: every lane joins the shuffles
    const int c = c0 + lane;
    float value = 0.f;
    for (int split = 0; split < a.splits; ++split) {
      const float w = __shfl_sync(0xffffffffu, weight, split);
      if (c < s.head_dim && w > 0.f) value = fmaf(w, a.part_out[(split * rows + flat) * s.head_dim + c], value);
    }
    if (c < s.head_dim) out[c] = from_float<T>(value * inv);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: shape checks, the split plan and the launches. `launch(kernel, grid, smem_bytes, stream, args)` runs
// one kernel (a CUDA launch in kvcache.cu, host fibers in the emulation).

inline bool valid_shape(const KVCacheShape& s) {
  const int dtype = static_cast<int>(s.dtype);
  return s.batch >= 0 && s.seqlen_q >= 0 && s.heads_kv >= 1 && s.heads_q >= 0 && s.heads_q % s.heads_kv == 0 &&
         s.head_dim >= 1 && s.head_dim <= kKVCacheMaxHeadDim && s.max_keys >= 0 && dtype >= 0 && dtype <= 2 &&
         static_cast<long long>(s.heads_q / s.heads_kv) * s.seqlen_q <= 0x7fffffff;
}

// Calls body(T{}) for the storage type of `s` (valid).
template <typename Body>
auto dispatch_type(const KVCacheShape& s, Body&& body) {
  switch (s.dtype) {
    case DType::Float16: return body(__half{});
    case DType::BFloat16: return body(__nv_bfloat16{});
    default: return body(float{});
  }
}

// Calls body(std::integral_constant<int, kD>{}) for the padded head dim (32, 64, 128, 256) of `s` (valid).
template <typename Body>
auto dispatch_head_dim(const KVCacheShape& s, Body&& body) {
  if (s.head_dim <= 32) return body(std::integral_constant<int, 32>{});
  if (s.head_dim <= 64) return body(std::integral_constant<int, 64>{});
  if (s.head_dim <= 128) return body(std::integral_constant<int, 128>{});
  return body(std::integral_constant<int, 256>{});
}

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

inline long long row_blocks(const KVCacheShape& s) {
  return ceil_div(static_cast<long long>(s.heads_q / s.heads_kv) * s.seqlen_q, kRows);
}

// FlashAttention-2's rule for `units` CTAs per split over `key_tiles` tiles on `slots` concurrent CTAs: no split
// when the units fill 80% of the slots; else the fewest splits whose wave efficiency (work / whole waves) is within
// 85% of the best, counting only split counts that change the tiles per split.
inline int num_splits(long long units, long long key_tiles, long long slots) {
  if (units >= 0.8 * slots || key_tiles <= 1) return 1;
  long long most = kKVCacheMaxSplits < slots ? kKVCacheMaxSplits : slots;
  most = most < key_tiles ? most : key_tiles;
  auto eligible = [&](long long n) { return n == 1 || ceil_div(key_tiles, n) != ceil_div(key_tiles, n - 1); };
  auto efficiency = [&](long long n) {
    const double waves = static_cast<double>(units * n) / slots;
    return waves / static_cast<double>(ceil_div(units * n, slots));
  };
  double best = 0.;
  for (long long n = 1; n <= most; ++n) {
    if (eligible(n) && efficiency(n) > best) best = efficiency(n);
  }
  for (long long n = 1; n <= most; ++n) {
    if (eligible(n) && efficiency(n) >= 0.85 * best) return static_cast<int>(n);
  }
  return 1;
}

// The plan for shape `s` (valid) when `slots` CTAs run at once: whole tiles per split, no empty split.
template <typename T, int kD>
KVCachePlan plan_for(const KVCacheShape& s, long long slots) {
  using P = TilePlan<T, kD>;
  const long long units = static_cast<long long>(s.batch) * s.heads_kv * row_blocks(s);
  const long long key_tiles = s.max_keys > 0 ? ceil_div(s.max_keys, P::kN) : 1;
  const long long per_split = ceil_div(key_tiles, num_splits(units, key_tiles, slots));
  return {static_cast<int>(ceil_div(key_tiles, per_split)), static_cast<int>(per_split * P::kN)};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// True when every step of `st` (elements of `bytes` bytes) keeps 16-byte alignment.
inline bool strides_aligned16(CacheStrides st, int64_t bytes) {
  return (st.batch * bytes) % 16 == 0 && (st.position * bytes) % 16 == 0 && (st.head * bytes) % 16 == 0;
}

// True when every key/value row of the caches and of k_new/v_new starts 16-byte aligned and holds whole vectors.
inline bool rows_aligned16(const Args& a, int64_t bytes) {
  const bool appended = a.k_new != nullptr;
  return (a.shape.head_dim * bytes) % 16 == 0 && aligned16(a.k_cache) && aligned16(a.v_cache) &&
         strides_aligned16(a.kc_s, bytes) && strides_aligned16(a.vc_s, bytes) &&
         (!appended || (aligned16(a.k_new) && aligned16(a.v_new) && strides_aligned16(a.kn_s, bytes) &&
                        strides_aligned16(a.vn_s, bytes)));
}

// True when the launcher accepts `args` with `plan` (the plan's fit to the head dim's tiles is checked later).
inline bool valid_launch(const Args& args, KVCachePlan plan) {
  return valid_shape(args.shape) && (args.k_new == nullptr) == (args.v_new == nullptr) && plan.splits >= 1 &&
         plan.splits <= kKVCacheMaxSplits && plan.split_keys >= 1 &&
         (plan.splits == 1 || (args.part_out != nullptr && args.part_lse != nullptr));
}

// The launches for storage type T (valid_launch holds). args: everything but splits, split_keys, row_blocks and
// vectorized, which come from here.
template <typename T, typename Launch>
cudaError_t run_forward_typed(Args args, KVCachePlan plan, cudaStream_t stream, Launch&& launch) {
  const KVCacheShape& s = args.shape;
  return dispatch_head_dim(s, [&](auto dim_tag) -> cudaError_t {
    constexpr int kD = decltype(dim_tag)::value;
    using P = TilePlan<T, kD>;
    if (plan.split_keys % P::kN != 0 || static_cast<long long>(plan.splits) * plan.split_keys < s.max_keys) {
      return cudaErrorInvalidValue;  // not a plan of this shape
    }
    const long long units = static_cast<long long>(s.batch) * s.heads_kv * row_blocks(s);
    const long long rows = static_cast<long long>(s.batch) * s.seqlen_q * s.heads_q;
    if (units == 0) return cudaSuccess;  // no query row, hence no new key either
    if (units > 0x7fffffff || ceil_div(rows, kWarps) > 0x7fffffff) return cudaErrorInvalidConfiguration;
    args.splits = plan.splits;
    args.split_keys = plan.split_keys;
    args.row_blocks = static_cast<int>(row_blocks(s));
    args.vectorized = rows_aligned16(args, sizeof(T));
    const cudaError_t err = launch(attend_kernel<T, kD>, dim3(static_cast<unsigned>(units), plan.splits),
                                   P::kBytes, stream, args);
    if (err != cudaSuccess || plan.splits == 1) return err;
    return launch(merge_kernel<T>, dim3(static_cast<unsigned>(ceil_div(rows, kWarps))), 0, stream, args);
  });
}

// Every storage type in one unit (the host emulation); the GPU build compiles one unit per type (kvcache_units.cuh).
template <typename Launch>
cudaError_t run_forward(const Args& args, KVCachePlan plan, cudaStream_t stream, Launch&& launch) {
  if (!valid_launch(args, plan)) return cudaErrorInvalidValue;
  return dispatch_type(args.shape, [&](auto type_tag) {
    return run_forward_typed<decltype(type_tag)>(args, plan, stream, launch);
  });
}

}  // namespace kvcache
}  // namespace dpar
