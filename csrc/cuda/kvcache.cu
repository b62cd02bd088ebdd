// GPU launchers of the KV-cache attention kernels (kvcache_kernels.cuh); see kvcache.h.
#include "cuda/kvcache.h"

#include <atomic>

#include "cuda/kvcache_kernels.cuh"

namespace dpar {
namespace {

// A kernel needs an opt-in for more than 48 KiB of dynamic shared memory (the head dim 256 plans).
template <typename Kernel>
cudaError_t allow_shared_bytes(Kernel kernel, int smem_bytes) {
  if (smem_bytes <= kvcache::kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

struct CudaLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream,
                         const kvcache::Args& args) const {
    const cudaError_t err = allow_shared_bytes(kernel, smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kvcache::kThreads, smem_bytes, stream>>>(args);
    return cudaGetLastError();
  }
};

constexpr int kMaxDevices = 64;

// CTAs of attend_kernel<T, kD> one SM of the current device holds at once (1 when the query fails), looked up once
// per device: the plan is made on every decode step.
template <typename T, int kD>
int resident_ctas() {
  static std::atomic<int> known[kMaxDevices];  // 0: not looked up yet
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) device = -1;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int known_per_sm = known[device].load(std::memory_order_relaxed);
    if (known_per_sm > 0) return known_per_sm;
  }
  using P = kvcache::TilePlan<T, kD>;
  int per_sm = 0;
  if (allow_shared_bytes(kvcache::attend_kernel<T, kD>, P::kBytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kvcache::attend_kernel<T, kD>, kvcache::kThreads,
                                                    P::kBytes) != cudaSuccess) {
    cudaGetLastError();  // the launch reports its own errors; here only the plan is at stake
    per_sm = 0;
  }
  per_sm = per_sm > 1 ? per_sm : 1;
  if (cached) known[device].store(per_sm, std::memory_order_relaxed);
  return per_sm;
}

}  // namespace

KVCachePlan kvcache_attention_plan(const KVCacheShape& shape, int sm_count) {
  if (!kvcache::valid_shape(shape) || sm_count < 1) return {0, 0};
  return kvcache::dispatch(shape, [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int kD = decltype(dim_tag)::value;
    return kvcache::plan_for<T, kD>(shape, static_cast<long long>(sm_count) * resident_ctas<T, kD>());
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
  return kvcache::run_forward(args, plan, stream, CudaLaunch{});
}

}  // namespace dpar
