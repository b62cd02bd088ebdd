// The varlen attention backward kernels of head dim 96 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::backward_on_gpu<96>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
