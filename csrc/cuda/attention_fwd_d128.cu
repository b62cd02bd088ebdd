// The varlen attention forward kernels of head dim 128 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::forward_on_gpu<128>(const KernelArgs&, cudaStream_t);
