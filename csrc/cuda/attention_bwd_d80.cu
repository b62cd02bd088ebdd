// The varlen attention backward kernels of head dim 80 (see attention_units.cuh).
#include "cuda/attention_units.cuh"

template cudaError_t dpar::attention::backward_on_gpu<80>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
