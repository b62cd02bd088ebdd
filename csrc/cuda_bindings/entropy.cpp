// Torch binding of the CUDA token_entropy kernel (schema defined in csrc/cpu/entropy.cpp).
#include <ATen/ops/empty.h>

#include "cuda/entropy.h"
#include "cuda_bindings/common.h"

namespace dpar {
namespace {

at::Tensor token_entropy_cuda(const at::Tensor& logits, double temperature) {
  TORCH_CHECK(logits.is_cuda(), "token_entropy: expected CUDA logits");
  TORCH_CHECK(logits.dim() == 2, "token_entropy: logits must be 2-D [N, V], got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) > 0, "token_entropy: logits must have a non-empty vocabulary dim");
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1, "token_entropy: logits must have stride(1) == 1");
  TORCH_CHECK(temperature > 0, "token_entropy: temperature must be > 0, got ", temperature);
  const DType dtype = to_dtype(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  check_launch(launch_token_entropy(logits.const_data_ptr(), out.mutable_data_ptr<float>(), logits.size(0),
                                    logits.size(1), logits.stride(0), static_cast<float>(1.0 / temperature), dtype,
                                    current_stream()),
               "token_entropy CUDA kernel");
  return out;
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_IMPL(dpar_C, CUDA, m) { m.impl("token_entropy", &dpar::token_entropy_cuda); }
