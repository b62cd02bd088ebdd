// Few-row linear layer (decode-time matmul): schema + CPU kernel. out [M, N] = x [M, K] . weight [N, K]^T + bias.
//
// At decode shapes (M = batch rows, a few to a few dozen) a matmul reads every weight once for a few rows, so it is
// bound by how fast the weights stream from memory. BLAS (MKL) reaches ~4 GB/s there on the 2-core CPU, a fifth of
// the machine's streaming read rate, with weights that are not in cache. This kernel keeps the weights' natural
// [N, K] layout (no packing) and reads each block of 4 weight rows from memory once (then L1) for all x rows, in
// register tiles of one vector of dot products, while prefetching the next block (cpu/kernels/linear.inc, on the
// active instruction-set path: cpu/isa.h).
// Other inputs (more than kMaxRows rows, not float32, K not a multiple of kDepthMultiple, a non-contiguous last
// dim) go to at::linear, so the op is a drop-in for it everywhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "cpu/isa.h"
#include "cpu/kernels/tables.h"

namespace dpar {
namespace {

// Rows up to which the kernel runs (on the 2-core CPU it beat at::linear 1.3-1.5x at 32 rows, 2.2-2.6x at 16, with
// weights from memory); with more rows each weight is reused enough that BLAS's packed, cache-blocked GEMM is the
// better tool, so they go to at::linear.
constexpr int64_t kMaxRows = 32;
constexpr int64_t kDepthMultiple = cpu::kMaxVectorBytes / sizeof(float);  // depth: whole vectors on every path
constexpr int64_t kBlock = cpu::kLinearColumnBlock;
constexpr int64_t kMinWorkPerThread = 1 << 20;  // multiply-adds below which another thread costs more than it saves

bool kernel_takes(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t depth = weight.size(1);
  return x2.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x2.size(0) <= kMaxRows &&
         depth % kDepthMultiple == 0 && x2.stride(1) == 1 && weight.stride(1) == 1 &&
         (!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->stride(0) == 1 &&
                                bias->size(0) == weight.size(0)));
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (x.dim() < 1 || weight.dim() != 2 || x.size(-1) != weight.size(1) || x.numel() == 0 || weight.numel() == 0) {
    return at::linear(x, weight, bias);  // its own errors and empty results
  }
  const int64_t depth = weight.size(1), outputs = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, depth});
  if (!kernel_takes(x2, weight, bias)) return at::linear(x, weight, bias);
  const int64_t rows = x2.size(0);
  at::Tensor out = at::empty({rows, outputs}, x.options());
  const float* xp = x2.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  const float* bp = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = (outputs + kBlock - 1) / kBlock;
  const int64_t work_per_block = rows * depth * kBlock;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / work_per_block);
  auto columns = [&](int64_t begin, int64_t end) {
    cpu::linear_kernels().columns(xp, x2.stride(0), rows, wp, weight.stride(0), outputs, depth, bp, op,
                                  begin * kBlock, std::min(end * kBlock, outputs));
  };
  if (blocks <= grain) {
    columns(0, blocks);  // one thread's work: no parallel region
  } else {
    at::parallel_for(0, blocks, grain, columns);
  }
  auto shape = x.sizes().vec();
  shape.back() = outputs;
  return out.view(shape);
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_FRAGMENT(dpar_C, m) { m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(dpar_C, CPU, m) { m.impl("linear", &dpar::linear_cpu); }
