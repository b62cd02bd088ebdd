// Torch-free launcher of the CUDA token_entropy kernel.
#pragma once
#include "cuda/common.h"

namespace dpar {

// logits: rows x vocab values of dtype, unit column stride, row_stride elements between rows (any alignment).
// out: rows float32 entropies (nats) of softmax(logits * inv_temperature); an all -inf row gives NaN.
cudaError_t launch_token_entropy(const void* logits, float* out, int64_t rows, int64_t vocab, int64_t row_stride,
                                 float inv_temperature, DType dtype, cudaStream_t stream);

}  // namespace dpar
