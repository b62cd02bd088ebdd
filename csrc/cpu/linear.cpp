// Few-row linear layer (decode-time matmul): schema + CPU kernel. out [M, N] = x [M, K] . weight [N, K]^T + bias.
//
// At decode shapes (M = batch rows, a few to a few dozen) a matmul reads every weight once for a few rows, so it is
// bound by how fast the weights stream from memory. BLAS (MKL) reaches ~4 GB/s there on the 2-core CPU, a fifth of
// the machine's streaming read rate, with weights that are not in cache. This kernel keeps the weights' natural
// [N, K] layout (no packing): a register tile of 4 x rows by 4 weight rows accumulates 16 dot products over K, 16
// lanes at a time, folded by one transpose_sum; each block of 4 weight rows is read from memory once (then L1) for
// all x rows, while software prefetches fetch the next block, spread over the block's tiles.
// Other inputs (more than kMaxRows rows, not float32, K not a multiple of the SIMD width, a non-contiguous last
// dim) go to at::linear, so the op is a drop-in for it everywhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include "cpu/attention_tiles.h"
#include "cpu/simd_fold.h"

namespace dpar {
namespace {

using S = cpu::attention::Simd<float>;
using vec = S::vec;
constexpr int kWidth = S::kWidth;

// Rows up to which the kernel runs (on the 2-core CPU it beat at::linear 1.3-1.5x at 32 rows, 2.2-2.6x at 16, with
// weights from memory); with more rows each weight is reused enough that BLAS's packed, cache-blocked GEMM is the
// better tool, so they go to at::linear.
constexpr int64_t kMaxRows = 32;
constexpr int kTileRows = 4;      // x rows per register tile
constexpr int kTileOutputs = 4;   // weight rows (outputs) per register tile
constexpr int kPrefetchBlocks = 1;  // weight blocks ahead of the one being multiplied (1-8 measured alike)
constexpr int64_t kMinWorkPerThread = 1 << 20;  // multiply-adds below which another thread costs more than it saves

// out[i * out_stride + j] = x row i . weight row j (+ bias[j]) for i < MR, j < NR. Tile `tile` of `tiles` over the
// block prefetches rows j = tile, tile + tiles, ... of `next` (the block kPrefetchBlocks ahead; null: none).
template <int MR, int NR>
DPAR_INLINE void dot_tile(const float* x, int64_t x_stride, const float* w, int64_t w_stride, int64_t depth,
                          const float* bias, float* out, int64_t out_stride, const float* next, int tile, int tiles) {
  vec acc[kWidth] = {};
  for (int64_t k = 0; k < depth; k += kWidth) {
    if (next != nullptr) {
      for (int j = tile; j < kTileOutputs; j += tiles) __builtin_prefetch(next + j * w_stride + k, 0, 0);
    }
    vec wk[NR];
    for (int j = 0; j < NR; ++j) wk[j] = S::load(w + j * w_stride + k);
    for (int i = 0; i < MR; ++i) {
      const vec xk = S::load(x + i * x_stride + k);
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += xk * wk[j];
    }
  }
  const vec sums = cpu::transpose_sum<float>(acc);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * out_stride + j] = sums[i * NR + j] + (bias == nullptr ? 0.f : bias[j]);
}

// All x rows against one block of NR weight rows.
template <int NR>
DPAR_INLINE void block_rows(const float* x, int64_t x_stride, int64_t rows, const float* w, int64_t w_stride,
                            int64_t depth, const float* bias, float* out, int64_t out_stride, const float* next) {
  const int tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
  int tile = 0;
  int64_t i = 0;
  for (; i + kTileRows <= rows; i += kTileRows, ++tile) {
    dot_tile<kTileRows, NR>(x + i * x_stride, x_stride, w, w_stride, depth, bias, out + i * out_stride, out_stride,
                            next, tile, tiles);
  }
  const float* xr = x + i * x_stride;
  float* outr = out + i * out_stride;
  switch (rows - i) {
    case 3: dot_tile<3, NR>(xr, x_stride, w, w_stride, depth, bias, outr, out_stride, next, tile, tiles); break;
    case 2: dot_tile<2, NR>(xr, x_stride, w, w_stride, depth, bias, outr, out_stride, next, tile, tiles); break;
    case 1: dot_tile<1, NR>(xr, x_stride, w, w_stride, depth, bias, outr, out_stride, next, tile, tiles); break;
    default: break;
  }
}

// Output columns [first, last) (first a multiple of kTileOutputs) of out [rows, outputs].
DPAR_SIMD_CLONES void linear_columns(const float* x, int64_t x_stride, int64_t rows, const float* w, int64_t w_stride,
                                     int64_t outputs, int64_t depth, const float* bias, float* out, int64_t first,
                                     int64_t last) {
  int64_t n = first;
  for (; n + kTileOutputs <= last; n += kTileOutputs) {
    const int64_t ahead = n + kPrefetchBlocks * kTileOutputs;
    const float* next = ahead + kTileOutputs <= outputs ? w + ahead * w_stride : nullptr;
    block_rows<kTileOutputs>(x, x_stride, rows, w + n * w_stride, w_stride, depth, bias == nullptr ? nullptr : bias + n,
                             out + n, outputs, next);
  }
  const float* wn = w + n * w_stride;
  const float* bn = bias == nullptr ? nullptr : bias + n;
  switch (last - n) {
    case 3: block_rows<3>(x, x_stride, rows, wn, w_stride, depth, bn, out + n, outputs, nullptr); break;
    case 2: block_rows<2>(x, x_stride, rows, wn, w_stride, depth, bn, out + n, outputs, nullptr); break;
    case 1: block_rows<1>(x, x_stride, rows, wn, w_stride, depth, bn, out + n, outputs, nullptr); break;
    default: break;
  }
}

bool kernel_takes(const at::Tensor& x2, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t depth = weight.size(1);
  return x2.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x2.size(0) <= kMaxRows &&
         depth % kWidth == 0 && x2.stride(1) == 1 && weight.stride(1) == 1 &&
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
  const int64_t blocks = (outputs + kTileOutputs - 1) / kTileOutputs;
  const int64_t work_per_block = rows * depth * kTileOutputs;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / work_per_block);
  auto columns = [&](int64_t begin, int64_t end) {
    linear_columns(xp, x2.stride(0), rows, wp, weight.stride(0), outputs, depth, bp, op, begin * kTileOutputs,
                   std::min(end * kTileOutputs, outputs));
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
