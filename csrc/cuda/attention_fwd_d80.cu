// The varlen attention forward kernels of head dim 80 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::forward_on_gpu<80>(const KernelArgs&, cudaStream_t);
