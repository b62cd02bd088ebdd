// Patch gather (max / sum / mean over each patch's tokens), its backward, and patch scatter: schemas + CPU kernels.
//
// Shapes: x [total, D] packed tokens (row stride free, stride(1) == 1), cu_tokens int32 [P+1] token offsets of each
// patch, out [P, D]. Each thread (at::parallel_for, OpenMP) takes one contiguous range of patches, balanced by tokens,
// and owns their output rows, so nothing is written twice and no atomics are needed. Accumulation is in fp32
// (fp64 for fp64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "cpu/kernels/tables.h"

namespace dpar {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // rough number of elements a thread should get at least

using Reduce = cpu::PatchReduce;

// The per-patch kernels of the active instruction-set path (cpu/isa.h, cpu/kernels/gather_scatter.inc) for a dtype,
// over its storage type (float16 / bfloat16 as uint16_t bits).
template <typename scalar_t>
struct PatchKernels;
template <>
struct PatchKernels<float> {
  using Stored = float;
  static const cpu::PatchRows<float, float>& get() { return cpu::gather_scatter_kernels().f32; }
};
template <>
struct PatchKernels<double> {
  using Stored = double;
  static const cpu::PatchRows<double, double>& get() { return cpu::gather_scatter_kernels().f64; }
};
template <>
struct PatchKernels<c10::Half> {
  using Stored = uint16_t;
  static const cpu::PatchRows<uint16_t, float>& get() { return cpu::gather_scatter_kernels().f16; }
};
template <>
struct PatchKernels<c10::BFloat16> {
  using Stored = uint16_t;
  static const cpu::PatchRows<uint16_t, float>& get() { return cpu::gather_scatter_kernels().bf16; }
};

Reduce parse_reduce(std::string_view reduce) {
  if (reduce == "max") return Reduce::kMax;
  if (reduce == "sum") return Reduce::kSum;
  if (reduce == "mean") return Reduce::kMean;
  TORCH_CHECK_VALUE(false, "reduce must be 'max', 'sum' or 'mean', got '", std::string(reduce), "'");
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name, " must have stride(1) == 1");
}

// Checks cu_tokens (int32 [P+1], 0 .. total, non-decreasing) so that no kernel can index out of bounds.
void check_offsets(const at::Tensor& cu, int64_t total) {
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "cu_tokens must be 1-D with at least one entry");
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "cu_tokens must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), "cu_tokens must be a CPU tensor");
  TORCH_CHECK_VALUE(cu.is_contiguous(), "cu_tokens must be contiguous");
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(c[0] == 0, "cu_tokens must start at 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i) TORCH_CHECK_VALUE(c[i] >= c[i - 1], "cu_tokens must be non-decreasing");
  TORCH_CHECK_VALUE(c[n - 1] == total, "cu_tokens must end at the total length ", total, ", got ", c[n - 1]);
}

// First patch p with cu[p] + p >= target: patch ranges balanced by tokens plus patches (an empty patch costs one).
int64_t patch_at_work(const int32_t* cu, int64_t num_patches, int64_t target) {
  int64_t lo = 0, hi = num_patches;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cu[mid] + mid >= target) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Runs body(patch_begin, patch_end) on one contiguous patch range per thread. Patches are consecutive token rows,
// so each thread reads and writes one contiguous slab (its own pages: first touch happens in parallel).
template <typename Body>
void for_each_patch_range(const int32_t* cu, int64_t num_patches, int64_t cols, const Body& body) {
  if (num_patches == 0) return;
  const int64_t work = cu[num_patches] + num_patches;
  const int64_t ranges = std::clamp<int64_t>(work * std::max<int64_t>(cols, 1) / kGrainElements, 1,
                                             at::get_num_threads());
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      body(patch_at_work(cu, num_patches, work * r / ranges), patch_at_work(cu, num_patches, work * (r + 1) / ranges));
    }
  });
}

template <typename scalar_t>
void gather_kernel(const at::Tensor& x, const int32_t* cu, Reduce reduce, at::Tensor& out, at::Tensor& argmax) {
  using acc_t = at::opmath_type<scalar_t>;
  using Stored = typename PatchKernels<scalar_t>::Stored;
  const auto& kernels = PatchKernels<scalar_t>::get();
  const Stored* xp = reinterpret_cast<const Stored*>(x.data_ptr<scalar_t>());
  const int64_t x_stride = x.stride(0);
  Stored* op = reinterpret_cast<Stored*>(out.data_ptr<scalar_t>());
  int32_t* ap = argmax.numel() > 0 ? argmax.data_ptr<int32_t>() : nullptr;  // null: no arg-max wanted
  const int64_t cols = x.size(1);
  for_each_patch_range(cu, out.size(0), cols, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> acc(cols);  // per-thread [cols] buffers: whole rows at a time
    std::vector<int32_t> arg(ap != nullptr ? cols : 0);
    for (int64_t p = p0; p < p1; ++p) {
      kernels.gather(xp, x_stride, cu[p], cu[p + 1], cols, reduce, op + p * cols,
                     ap != nullptr ? ap + p * cols : nullptr, acc.data(), arg.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> patch_gather_cpu(const at::Tensor& x, const at::Tensor& cu_tokens,
                                                     std::string_view reduce_name, bool with_argmax) {
  const Reduce reduce = parse_reduce(reduce_name);
  check_rows(x, "x");
  const at::Tensor cu = cu_tokens.contiguous();
  check_offsets(cu, x.size(0));
  const int64_t num_patches = cu.numel() - 1;
  at::Tensor out = at::empty({num_patches, x.size(1)}, x.options());
  at::Tensor argmax = reduce == Reduce::kMax && with_argmax ? at::empty({num_patches, x.size(1)}, x.options().dtype(at::kInt))
                                             : at::empty({0}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patch_gather_cpu", [&] {
    gather_kernel<scalar_t>(x, cu.data_ptr<int32_t>(), reduce, out, argmax);
  });
  return {out, argmax};
}

template <typename scalar_t>
void gather_backward_kernel(const at::Tensor& grad_out, const int32_t* cu, const int32_t* argmax, Reduce reduce,
                            at::Tensor& grad_x, std::atomic<bool>& bad_argmax) {
  using Stored = typename PatchKernels<scalar_t>::Stored;
  const auto& kernels = PatchKernels<scalar_t>::get();
  const Stored* gp = reinterpret_cast<const Stored*>(grad_out.data_ptr<scalar_t>());
  Stored* xp = reinterpret_cast<Stored*>(grad_x.data_ptr<scalar_t>());
  const int64_t cols = grad_out.size(1);
  // each token row is written once: its patch's gradient where it is the column's arg-max (max) or everywhere
  // (sum: the gradient, mean: the gradient / length); an arg-max outside its patch gives its column no gradient
  for_each_patch_range(cu, grad_out.size(0), cols, [&](int64_t p0, int64_t p1) {
    std::vector<Stored> scaled(reduce == Reduce::kMax ? 0 : cols);  // per-thread [cols] buffer
    for (int64_t p = p0; p < p1; ++p) {
      if (kernels.spread(gp + p * cols, argmax != nullptr ? argmax + p * cols : nullptr, cu[p], cu[p + 1], cols,
                         reduce, xp, scaled.data())) {
        bad_argmax = true;
      }
    }
  });
}

at::Tensor patch_gather_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& cu_tokens,
                                     const at::Tensor& argmax_in, int64_t total, std::string_view reduce_name) {
  const Reduce reduce = parse_reduce(reduce_name);
  check_rows(grad_out_in, "grad_out");
  TORCH_CHECK_VALUE(total >= 0, "total must be >= 0, got ", total);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor cu = cu_tokens.contiguous();
  check_offsets(cu, total);
  TORCH_CHECK_VALUE(cu.numel() - 1 == grad_out.size(0), "grad_out must have one row per patch (", cu.numel() - 1,
              "), got ", grad_out.size(0));
  at::Tensor argmax;
  if (reduce == Reduce::kMax) {
    TORCH_CHECK_VALUE(argmax_in.scalar_type() == at::kInt && argmax_in.sizes() == grad_out.sizes(),
                "argmax must be int32 with the shape of grad_out");
    argmax = argmax_in.contiguous();
  }
  at::Tensor grad_x = at::empty({total, grad_out.size(1)}, grad_out.options());
  std::atomic<bool> bad_argmax{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "patch_gather_backward_cpu",
                                  [&] {
    gather_backward_kernel<scalar_t>(grad_out, cu.data_ptr<int32_t>(),
                                     reduce == Reduce::kMax ? argmax.data_ptr<int32_t>() : nullptr, reduce, grad_x,
                                     bad_argmax);
  });
  TORCH_CHECK_VALUE(!bad_argmax, "argmax holds a token outside its patch");
  return grad_x;
}

template <typename scalar_t>
void scatter_kernel(const at::Tensor& y, const int32_t* cu, at::Tensor& out) {
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t y_stride = y.stride(0);
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t cols = y.size(1);
  for_each_patch_range(cu, y.size(0), cols, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* src = yp + p * y_stride;
      for (int64_t t = cu[p]; t < cu[p + 1]; ++t) std::copy(src, src + cols, op + t * cols);
    }
  });
}

at::Tensor patch_scatter_cpu(const at::Tensor& y, const at::Tensor& cu_tokens, int64_t total) {
  check_rows(y, "y");
  TORCH_CHECK_VALUE(total >= 0, "total must be >= 0, got ", total);
  const at::Tensor cu = cu_tokens.contiguous();
  check_offsets(cu, total);
  TORCH_CHECK_VALUE(cu.numel() - 1 == y.size(0), "y must have one row per patch (", cu.numel() - 1, "), got ",
              y.size(0));
  at::Tensor out = at::empty({total, y.size(1)}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "patch_scatter_cpu", [&] {
    scatter_kernel<scalar_t>(y, cu.data_ptr<int32_t>(), out);
  });
  return out;
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_FRAGMENT(dpar_C, m) {
  m.def("patch_gather(Tensor x, Tensor cu_tokens, str reduce, bool with_argmax) -> (Tensor, Tensor)");
  m.def("patch_gather_backward(Tensor grad_out, Tensor cu_tokens, Tensor argmax, int total, str reduce) -> Tensor");
  m.def("patch_scatter(Tensor y, Tensor cu_tokens, int total) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpar_C, CPU, m) {
  m.impl("patch_gather", &dpar::patch_gather_cpu);
  m.impl("patch_gather_backward", &dpar::patch_gather_backward_cpu);
  m.impl("patch_scatter", &dpar::patch_scatter_cpu);
}
