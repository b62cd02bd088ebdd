// Torch-free launcher of the KV-cache attention kernels (flash_attn_with_kvcache layout), flash-decoding style:
// split-KV partial attention with the cache write fused in, then a log-sum-exp merge of the splits.
//
// q, out [batch, seqlen_q, heads_q, head_dim]; k_cache, v_cache [batch, max_keys, heads_kv, head_dim]; k_new, v_new
// [batch, seqlen_q, heads_kv, head_dim] (optional, null when absent), each addressed through (batch, position,
// head) strides in elements with a contiguous last dim. cache_seqlens: int32 [batch] device array, read on the
// device only. Semantics as dpar_kernels/kvcache/naive.py: cached length clamped to [0, max_keys], new keys written
// at cached + i below max_keys (others dropped), query i sees keys [0, end_i) with end_i = min(max_keys, cached +
// new - seqlen_q + i + 1) when causal (min(max_keys, cached + new) otherwise); a query without keys outputs 0.
#pragma once
#include <cstdint>

#include "cuda/common.h"

namespace dpar {

struct KVCacheShape {
  int batch;
  int seqlen_q;
  int heads_q;
  int heads_kv;
  int head_dim;  // 1 .. 256
  int max_keys;
  float softmax_scale;
  bool causal;
  DType dtype;
};

struct CacheStrides {
  int64_t batch;
  int64_t position;
  int64_t head;
};

constexpr int kKVCacheMaxHeadDim = 256;
constexpr int kKVCacheMaxSplits = 32;

// How the keys are split: `splits` CTAs per (batch, kv head, row block), each over `split_keys` keys.
struct KVCachePlan {
  int splits;
  int split_keys;
};

// The plan for `shape` on a device with `sm_count` SMs (the current device): FlashAttention-2's wave rule over the
// B x Hk x row-block CTAs against the CTAs the SMs hold at once. {0, 0} for a shape the launcher rejects.
KVCachePlan kvcache_attention_plan(const KVCacheShape& shape, int sm_count);

// plan: from kvcache_attention_plan for the same shape. With plan.splits > 1 the workspaces are needed:
// workspace_out fp32 [splits * batch * seqlen_q * heads_q * head_dim], workspace_lse fp32 [splits * batch * seqlen_q
// * heads_q]; with one split they may be null. Every element of out is written.
cudaError_t kvcache_attention_forward(const KVCacheShape& shape, KVCachePlan plan, const void* q,
                                      CacheStrides q_strides, void* k_cache, CacheStrides k_cache_strides,
                                      void* v_cache, CacheStrides v_cache_strides, const int32_t* cache_seqlens,
                                      const void* k_new, CacheStrides k_new_strides, const void* v_new,
                                      CacheStrides v_new_strides, void* out, CacheStrides out_strides,
                                      float* workspace_out, float* workspace_lse, cudaStream_t stream);

}  // namespace dpar
