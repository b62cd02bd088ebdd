// The varlen attention forward kernels of head dim 64 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::forward_on_gpu<64>(const KernelArgs&, cudaStream_t);
