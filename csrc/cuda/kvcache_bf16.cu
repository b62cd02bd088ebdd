// The KV-cache attention kernels for __nv_bfloat16 storage (see kvcache_units.cuh).
#include "cuda/kvcache_units.cuh"

template dpar::KVCachePlan dpar::kvcache::plan_on_gpu<__nv_bfloat16>(const KVCacheShape&, int);
template cudaError_t dpar::kvcache::forward_on_gpu<__nv_bfloat16>(const Args&, KVCachePlan, cudaStream_t);
