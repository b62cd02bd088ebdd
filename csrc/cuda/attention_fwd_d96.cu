// The varlen attention forward kernels of head dim 96 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::forward_on_gpu<96>(const KernelArgs&, cudaStream_t);
