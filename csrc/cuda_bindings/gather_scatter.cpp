// CUDA-key registrations of dpar_C::patch_gather / patch_gather_backward / patch_scatter (schemas in
// csrc/cpu/gather_scatter.cpp). Checks the tensors, allocates outputs and calls the torch-free launchers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <string>
#include <string_view>

#include "cuda/gather_scatter.h"
#include "cuda_bindings/common.h"

namespace dpar {
namespace {

GatherReduce parse_reduce(std::string_view reduce) {
  if (reduce == "max") return GatherReduce::Max;
  if (reduce == "sum") return GatherReduce::Sum;
  if (reduce == "mean") return GatherReduce::Mean;
  TORCH_CHECK_VALUE(false, "reduce must be 'max', 'sum' or 'mean', got '", std::string(reduce), "'");
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name, " must have stride(1) == 1");
}

// Offsets are validated by the Python wrapper (reading them here would sync); the kernels also skip bad ranges.
void check_offsets(const at::Tensor& cu, const at::Tensor& data, int64_t patches) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "cu_tokens must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.is_contiguous(), "cu_tokens must be a contiguous 1-D tensor");
  TORCH_CHECK_VALUE(cu.device() == data.device(), "cu_tokens is on ", cu.device(), " but the data is on ",
                    data.device());
  TORCH_CHECK_VALUE(patches < 0 || cu.numel() == patches + 1, "cu_tokens must have ", patches + 1, " entries, got ",
                    cu.numel());
}

std::tuple<at::Tensor, at::Tensor> patch_gather_cuda(const at::Tensor& x, const at::Tensor& cu_tokens,
                                                     std::string_view reduce_name, bool with_argmax_wanted) {
  const GatherReduce reduce = parse_reduce(reduce_name);
  check_rows(x, "x");
  TORCH_CHECK_VALUE(cu_tokens.numel() >= 1, "cu_tokens must have at least one entry");
  check_offsets(cu_tokens, x, -1);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t patches = cu_tokens.numel() - 1;
  at::Tensor out = at::empty({patches, x.size(1)}, x.options());
  const bool with_argmax = reduce == GatherReduce::Max && with_argmax_wanted;
  at::Tensor argmax = with_argmax ? at::empty({patches, x.size(1)}, x.options().dtype(at::kInt))
                                  : at::empty({0}, x.options().dtype(at::kInt));
  check_launch(launch_patch_gather(x.data_ptr(), x.stride(0), cu_tokens.data_ptr<int32_t>(), patches, x.size(0),
                                   x.size(1), reduce, out.data_ptr(),
                                   with_argmax ? argmax.data_ptr<int32_t>() : nullptr, to_dtype(x), current_stream()),
               "patch_gather");
  return {out, argmax};
}

at::Tensor patch_gather_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& cu_tokens,
                                      const at::Tensor& argmax_in, int64_t total, std::string_view reduce_name) {
  const GatherReduce reduce = parse_reduce(reduce_name);
  check_rows(grad_out_in, "grad_out");
  TORCH_CHECK_VALUE(total >= 0, "total must be >= 0, got ", total);
  const at::Tensor grad_out = grad_out_in.contiguous();
  check_offsets(cu_tokens, grad_out, grad_out.size(0));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor argmax;
  SpreadMode mode = reduce == GatherReduce::Mean ? SpreadMode::Mean : SpreadMode::Copy;
  if (reduce == GatherReduce::Max) {
    TORCH_CHECK_VALUE(argmax_in.scalar_type() == at::kInt && argmax_in.sizes() == grad_out.sizes() &&
                          argmax_in.device() == grad_out.device(),
                      "argmax must be int32 with the shape and device of grad_out");
    argmax = argmax_in.contiguous();
    mode = SpreadMode::ArgmaxRoute;
  }
  at::Tensor grad_x = at::empty({total, grad_out.size(1)}, grad_out.options());
  check_launch(launch_patch_spread(grad_out.data_ptr(), grad_out.stride(0), cu_tokens.data_ptr<int32_t>(),
                                   argmax.defined() ? argmax.data_ptr<int32_t>() : nullptr, grad_out.size(0), total,
                                   grad_out.size(1), mode, grad_x.data_ptr(), to_dtype(grad_out), current_stream()),
               "patch_gather_backward");
  return grad_x;
}

at::Tensor patch_scatter_cuda(const at::Tensor& y, const at::Tensor& cu_tokens, int64_t total) {
  check_rows(y, "y");
  TORCH_CHECK_VALUE(total >= 0, "total must be >= 0, got ", total);
  check_offsets(cu_tokens, y, y.size(0));
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty({total, y.size(1)}, y.options());
  check_launch(launch_patch_spread(y.data_ptr(), y.stride(0), cu_tokens.data_ptr<int32_t>(), nullptr, y.size(0),
                                   total, y.size(1), SpreadMode::Copy, out.data_ptr(), to_dtype(y), current_stream()),
               "patch_scatter");
  return out;
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_IMPL(dpar_C, CUDA, m) {
  m.impl("patch_gather", &dpar::patch_gather_cuda);
  m.impl("patch_gather_backward", &dpar::patch_gather_backward_cuda);
  m.impl("patch_scatter", &dpar::patch_scatter_cuda);
}
