// GPU launchers of the KV-cache attention kernels; see kvcache.h. The kernels are compiled in the units of
// kvcache_units.cuh (one per storage type); this file only picks the unit of the shape's type.
#include "cuda/kvcache.h"

#include "cuda/kvcache_units.cuh"

namespace dpar {

KVCachePlan kvcache_attention_plan(const KVCacheShape& shape, int sm_count) {
  if (!kvcache::valid_shape(shape) || sm_count < 1) return {0, 0};
  return kvcache::dispatch_type(shape, [&](auto type_tag) {
    return kvcache::plan_on_gpu<decltype(type_tag)>(shape, sm_count);
  });
}

cudaError_t kvcache_attention_forward(const KVCacheShape& shape, KVCachePlan plan, const void* q,
                                      CacheStrides q_strides, void* k_cache, CacheStrides k_cache_strides,
                                      void* v_cache, CacheStrides v_cache_strides, const int32_t* cache_seqlens,
                                      const void* k_new, CacheStrides k_new_strides, const void* v_new,
                                      CacheStrides v_new_strides, void* out, CacheStrides out_strides,
                                      float* workspace_out, float* workspace_lse, cudaStream_t stream) {
  kvcache::Args args{};
  args.shape = shape;
  args.q = q;
  args.k_cache = k_cache;
  args.v_cache = v_cache;
  args.k_new = k_new;
  args.v_new = v_new;
  args.out = out;
  args.q_s = q_strides;
  args.kc_s = k_cache_strides;
  args.vc_s = v_cache_strides;
  args.kn_s = k_new_strides;
  args.vn_s = v_new_strides;
  args.out_s = out_strides;
  args.cache_seqlens = cache_seqlens;
  args.part_out = workspace_out;
  args.part_lse = workspace_lse;
  if (!kvcache::valid_launch(args, plan)) return cudaErrorInvalidValue;
  return kvcache::dispatch_type(shape, [&](auto type_tag) {
    return kvcache::forward_on_gpu<decltype(type_tag)>(args, plan, stream);
  });
}

}  // namespace dpar
