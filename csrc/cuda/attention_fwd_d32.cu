// The varlen attention forward kernels of head dim 32 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::forward_on_gpu<32>(const KernelArgs&, cudaStream_t);
