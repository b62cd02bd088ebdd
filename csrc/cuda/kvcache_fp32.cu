// The KV-cache attention kernels for float storage (see kvcache_units.cuh).
#include "cuda/kvcache_units.cuh"

template dpar::KVCachePlan dpar::kvcache::plan_on_gpu<float>(const KVCacheShape&, int);
template cudaError_t dpar::kvcache::forward_on_gpu<float>(const Args&, KVCachePlan, cudaStream_t);
