// The GPU launchers of the KV-cache attention kernels, one compilation unit per storage type: each
// kvcache_<type>.cu instantiates the templates below for its type, so that a parallel build compiles the kernels in
// three short units. kvcache.cu sees the extern declarations only.
#pragma once
#include <atomic>

#include "cuda/kvcache_kernels.cuh"

namespace dpar {
namespace kvcache {

// A kernel needs an opt-in for more than 48 KiB of dynamic shared memory (the head dim 256 plans).
template <typename Kernel>
cudaError_t allow_shared_bytes(Kernel kernel, int smem_bytes) {
  if (smem_bytes <= kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

struct CudaLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream, const Args& args) const {
    const cudaError_t err = allow_shared_bytes(kernel, smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
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
  using P = TilePlan<T, kD>;
  int per_sm = 0;
  if (allow_shared_bytes(attend_kernel<T, kD>, P::kBytes) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attend_kernel<T, kD>, kThreads, P::kBytes) !=
          cudaSuccess) {
    cudaGetLastError();  // the launch reports its own errors; here only the plan is at stake
    per_sm = 0;
  }
  per_sm = per_sm > 1 ? per_sm : 1;
  if (cached) known[device].store(per_sm, std::memory_order_relaxed);
  return per_sm;
}

// The plan and the launches for storage type T (shape valid, of type T).
template <typename T>
KVCachePlan plan_on_gpu(const KVCacheShape& shape, int sm_count) {
  return dispatch_head_dim(shape, [&](auto dim_tag) {
    constexpr int kD = decltype(dim_tag)::value;
    return plan_for<T, kD>(shape, static_cast<long long>(sm_count) * resident_ctas<T, kD>());
  });
}

template <typename T>
cudaError_t forward_on_gpu(const Args& args, KVCachePlan plan, cudaStream_t stream) {
  return run_forward_typed<T>(args, plan, stream, CudaLaunch{});
}

extern template KVCachePlan plan_on_gpu<float>(const KVCacheShape&, int);
extern template KVCachePlan plan_on_gpu<__half>(const KVCacheShape&, int);
extern template KVCachePlan plan_on_gpu<__nv_bfloat16>(const KVCacheShape&, int);
extern template cudaError_t forward_on_gpu<float>(const Args&, KVCachePlan, cudaStream_t);
extern template cudaError_t forward_on_gpu<__half>(const Args&, KVCachePlan, cudaStream_t);
extern template cudaError_t forward_on_gpu<__nv_bfloat16>(const Args&, KVCachePlan, cudaStream_t);

}  // namespace kvcache
}  // namespace dpar
