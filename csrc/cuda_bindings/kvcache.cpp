// CUDA kernel of dpar_C::kvcache_attention (schema in csrc/cpu/kvcache.cpp): checks, workspaces, launch.
#include <ATen/ATen.h>

#include <optional>

#include "cuda/kvcache.h"

#include "cuda_bindings/common.h"

namespace dpar {
namespace {

void check_cuda4d(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "kvcache_attention: ", name, " must be on ", q.device());
  TORCH_CHECK(t.dim() == 4, "kvcache_attention: ", name, " must be 4-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "kvcache_attention: ", name, " must have dtype ", q.scalar_type());
  TORCH_CHECK(t.stride(3) == 1, "kvcache_attention: ", name, " must have a contiguous last dim");
}

CacheStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

at::Tensor kvcache_attention_cuda(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k,
                                  const std::optional<at::Tensor>& v, double softmax_scale, bool causal) {
  check_cuda4d(q, "q", q);
  check_cuda4d(k_cache, "k_cache", q);
  check_cuda4d(v_cache, "v_cache", q);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "kvcache_attention: k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(3),
              "kvcache_attention: k_cache must be [B, S_max, Hk, d] with q's B and d");
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0,
              "kvcache_attention: the number of query heads must be a multiple of k_cache's heads");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kKVCacheMaxHeadDim, "kvcache_attention (cuda): head dim must be in [1, ",
              kKVCacheMaxHeadDim, "], got ", q.size(3));
  TORCH_CHECK(k.has_value() == v.has_value(), "kvcache_attention: k and v must be given together");
  if (k.has_value()) {
    check_cuda4d(*k, "k", q);
    check_cuda4d(*v, "v", q);
    const std::vector<int64_t> expected{q.size(0), q.size(1), k_cache.size(2), q.size(3)};
    TORCH_CHECK(k->sizes() == expected && v->sizes() == expected, "kvcache_attention: k and v must be ", expected);
  }
  TORCH_CHECK(cache_seqlens.is_cuda() && cache_seqlens.device() == q.device() &&
                  cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.numel() == q.size(0) && cache_seqlens.is_contiguous(),
              "kvcache_attention: cache_seqlens must be a contiguous int32 [B] tensor on ", q.device());
  TORCH_CHECK(q.size(0) * q.size(1) <= INT32_MAX && q.size(2) <= INT32_MAX && k_cache.size(1) <= INT32_MAX &&
                  q.size(2) / k_cache.size(2) * q.size(1) <= INT32_MAX,
              "kvcache_attention (cuda): at most 2^31 - 1 query rows (B x Sq), heads, cache positions and query rows "
              "per kv head (Hq / Hk x Sq)");
  KVCacheShape shape{};
  shape.batch = static_cast<int>(q.size(0));
  shape.seqlen_q = static_cast<int>(q.size(1));
  shape.heads_q = static_cast<int>(q.size(2));
  shape.heads_kv = static_cast<int>(k_cache.size(2));
  shape.head_dim = static_cast<int>(q.size(3));
  shape.max_keys = static_cast<int>(k_cache.size(1));
  shape.softmax_scale = static_cast<float>(softmax_scale);
  shape.causal = causal;
  shape.dtype = to_dtype(q);
  const c10::cuda::CUDAGuard guard(q.device());
  // the split count follows the occupancy of this device (its SM count; a cached host-side property)
  const KVCachePlan plan = kvcache_attention_plan(shape, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  TORCH_CHECK(plan.splits >= 1, "kvcache_attention (cuda): no launch plan for this shape");
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t rows = q.size(0) * q.size(1) * q.size(2);
  at::Tensor part_out, part_lse;  // the splits' partial results, only with more than one split
  if (plan.splits > 1) {
    part_out = at::empty({plan.splits, rows, q.size(3)}, q.options().dtype(at::kFloat));
    part_lse = at::empty({plan.splits, rows}, q.options().dtype(at::kFloat));
  }
  const CacheStrides none{0, 0, 0};
  check_launch(kvcache_attention_forward(shape, plan, q.data_ptr(), strides_of(q), k_cache.data_ptr(),
                                         strides_of(k_cache), v_cache.data_ptr(), strides_of(v_cache),
                                         cache_seqlens.data_ptr<int32_t>(), k ? k->data_ptr() : nullptr,
                                         k ? strides_of(*k) : none, v ? v->data_ptr() : nullptr,
                                         v ? strides_of(*v) : none, out.data_ptr(), strides_of(out),
                                         plan.splits > 1 ? part_out.data_ptr<float>() : nullptr,
                                         plan.splits > 1 ? part_lse.data_ptr<float>() : nullptr, current_stream()),
               "kvcache_attention (cuda)");
  return out;
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_IMPL(dpar_C, CUDA, m) { m.impl("kvcache_attention", &dpar::kvcache_attention_cuda); }
