// The varlen attention backward kernels of head dim 128 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::backward_on_gpu<128>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
