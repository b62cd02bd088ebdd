// The varlen attention backward kernels of head dim 32 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::backward_on_gpu<32>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
