// Runs the CUDA KV-cache attention kernels (csrc/cuda/kvcache_kernels.cuh) on the host, for tests without a GPU.
//
// Threads are fibers (block_emulation.h); cp.async copies are plain 16-byte copies done at issue time (the kernel
// waits and synchronises before reading a stage, as on the GPU). Built as a shared library by
// tests/csrc/test_cuda_kvcache_host.py and called through ctypes with torch CPU tensors standing in for device
// memory.
#define DPAR_KVCACHE_HOST_EMULATION 1

#include "block_emulation.h"

#include <cmath>
#include <cstring>

#include "cuda/kvcache_kernels.cuh"

namespace dpar {
namespace kvcache {

unsigned char* shared_bytes() { return emulation::shared_memory(); }

void copy_16_async(void* shared, const void* global, bool valid) {
  if (valid) {
    std::memcpy(shared, global, 16);
  } else {
    std::memset(shared, 0, 16);
  }
}

void copy_async_commit() {}
void copy_async_wait_all_but_newest() {}

namespace {

struct HostLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t, const Args& args) const {
    return emulation::run_grid(grid, kThreads, smem_bytes, 16, [&] { kernel(args); });
  }
};

}  // namespace
}  // namespace kvcache
}  // namespace dpar

namespace {

// sizes: batch, seqlen_q, heads_q, heads_kv, head_dim, max_keys.
dpar::KVCacheShape make_shape(int dtype, const int* sizes, float scale, int causal) {
  dpar::KVCacheShape shape{};
  shape.batch = sizes[0];
  shape.seqlen_q = sizes[1];
  shape.heads_q = sizes[2];
  shape.heads_kv = sizes[3];
  shape.head_dim = sizes[4];
  shape.max_keys = sizes[5];
  shape.softmax_scale = scale;
  shape.causal = causal != 0;
  shape.dtype = static_cast<dpar::DType>(dtype);
  return shape;
}

}  // namespace

// The plan the launcher would use on a GPU running `slots` CTAs at once: {splits, split_keys}; {0, 0} when rejected.
extern "C" void dpar_emulated_kvcache_plan(int dtype, const int* sizes, int64_t slots, int* plan) {
  const dpar::KVCacheShape shape = make_shape(dtype, sizes, 1.f, 1);
  dpar::KVCachePlan result{0, 0};
  if (dpar::kvcache::valid_shape(shape)) {
    result = dpar::kvcache::dispatch_type(shape, [&](auto type_tag) {
      return dpar::kvcache::dispatch_head_dim(shape, [&](auto dim_tag) {
        return dpar::kvcache::plan_for<decltype(type_tag), decltype(dim_tag)::value>(shape, slots);
      });
    });
  }
  plan[0] = result.splits;
  plan[1] = result.split_keys;
}

namespace {

// strides: (batch, position, head) triples in elements for q, k_cache, v_cache, k_new, v_new, out.
dpar::kvcache::Args make_args(int dtype, const int* sizes, float scale, int causal, const void* q, void* k_cache,
                              void* v_cache, const int32_t* cache_seqlens, const void* k_new, const void* v_new,
                              void* out, float* workspace_out, float* workspace_lse, const int64_t* strides) {
  auto triple = [strides](int n) { return dpar::CacheStrides{strides[3 * n], strides[3 * n + 1], strides[3 * n + 2]}; };
  dpar::kvcache::Args args{};
  args.shape = make_shape(dtype, sizes, scale, causal);
  args.q = q;
  args.k_cache = k_cache;
  args.v_cache = v_cache;
  args.k_new = k_new;
  args.v_new = v_new;
  args.out = out;
  args.q_s = triple(0);
  args.kc_s = triple(1);
  args.vc_s = triple(2);
  args.kn_s = triple(3);
  args.vn_s = triple(4);
  args.out_s = triple(5);
  args.cache_seqlens = cache_seqlens;
  args.part_out = workspace_out;
  args.part_lse = workspace_lse;
  return args;
}

}  // namespace

// k_new/v_new may be null; workspace_out/lse: as kvcache.h for plan[0] splits. Returns the cudaError_t.
extern "C" int dpar_emulated_kvcache_forward(int dtype, const int* sizes, float scale, int causal, const int* plan,
                                             const void* q, void* k_cache, void* v_cache,
                                             const int32_t* cache_seqlens, const void* k_new, const void* v_new,
                                             void* out, float* workspace_out, float* workspace_lse,
                                             const int64_t* strides) {
  const dpar::kvcache::Args args = make_args(dtype, sizes, scale, causal, q, k_cache, v_cache, cache_seqlens, k_new,
                                             v_new, out, workspace_out, workspace_lse, strides);
  return dpar::kvcache::run_forward(args, dpar::KVCachePlan{plan[0], plan[1]}, nullptr,
                                    dpar::kvcache::HostLaunch{});
}

// Whether the launcher takes the 16-byte vector path for these tensors (so that tests can cover both paths).
extern "C" int dpar_emulated_kvcache_vectorized(int dtype, const int* sizes, void* k_cache, void* v_cache,
                                                const void* k_new, const void* v_new, const int64_t* strides) {
  const dpar::kvcache::Args args = make_args(dtype, sizes, 1.f, 1, nullptr, k_cache, v_cache, nullptr, k_new, v_new,
                                             nullptr, nullptr, nullptr, strides);
  return dpar::kvcache::rows_aligned16(args, dtype == 0 ? 4 : 2);
}
