// CPU kernels of the entropy family.
//   token_entropy(logits [N, V], temperature) -> entropy [N] (float32; float64 for float64 logits)
//   entropy_state_update(tile [R, v], m [R], s [R], w [R], temperature): merges one vocabulary tile into the running
//     state (m = max logit, s = sum exp((z-m)/T), w = sum ((z-m)/T) exp((z-m)/T)) used by linear_entropy.
// The row states come from the active instruction-set path's kernels (cpu/isa.h, cpu/kernels/entropy.inc): one pass
// over each row. Entropy = log s - w / s.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/kernels/tables.h"

namespace dpar {
namespace {

using cpu::EntropyState;

// The row kernels of the active instruction-set path (cpu/isa.h, cpu/kernels/entropy.inc).
inline EntropyState<float> row_state(const float* row, int64_t V, float inv_t) {
  return cpu::entropy_kernels().f32(row, V, inv_t);
}
inline EntropyState<float> row_state(const c10::Half* row, int64_t V, float inv_t) {
  return cpu::entropy_kernels().f16(reinterpret_cast<const uint16_t*>(row), V, inv_t);
}
inline EntropyState<float> row_state(const c10::BFloat16* row, int64_t V, float inv_t) {
  return cpu::entropy_kernels().bf16(reinterpret_cast<const uint16_t*>(row), V, inv_t);
}
inline EntropyState<double> row_state(const double* row, int64_t V, double inv_t) {
  return cpu::entropy_kernels().f64(row, V, inv_t);
}

template <typename Acc>
inline Acc entropy_of(EntropyState<Acc> st) {
  if (st.s == Acc(0)) return std::numeric_limits<Acc>::quiet_NaN();  // every logit -inf: no distribution
  return std::log(st.s) - st.w / st.s;
}

// Rows per parallel task so that each task reads at least ~64k values.
inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have a non-empty vocabulary dim");
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1, op, ": logits must have stride(1) == 1, got ",
              logits.stride(1));
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": logits must be float32, float16, bfloat16 or float64, got ", dt);
}

at::Tensor token_entropy_cpu(const at::Tensor& logits, double temperature) {
  check_logits(logits, "token_entropy");
  TORCH_CHECK(logits.device().is_cpu(), "token_entropy: expected CPU logits");
  TORCH_CHECK(temperature > 0, "token_entropy: temperature must be > 0, got ", temperature);
  const bool fp64 = logits.scalar_type() == at::kDouble;
  const int64_t N = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  at::Tensor out = at::empty({N}, logits.options().dtype(fp64 ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_entropy_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    Acc* dst = out.mutable_data_ptr<Acc>();
    const Acc inv_t = static_cast<Acc>(1.0 / temperature);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dst[r] = entropy_of(row_state(base + r * row_stride, V, inv_t));
    });
  });
  return out;
}

void entropy_state_update_cpu(const at::Tensor& tile, at::Tensor& m, at::Tensor& s, at::Tensor& w,
                              double temperature) {
  check_logits(tile, "entropy_state_update");
  TORCH_CHECK(temperature > 0, "entropy_state_update: temperature must be > 0, got ", temperature);
  const int64_t R = tile.size(0), V = tile.size(1), row_stride = tile.stride(0);
  const auto acc_type = tile.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&m, &s, &w}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == R && t->is_contiguous(),
                "entropy_state_update: m, s, w must be contiguous [", R, "] vectors");
    TORCH_CHECK(t->scalar_type() == acc_type, "entropy_state_update: state dtype must be ", acc_type, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device().is_cpu(), "entropy_state_update: expected CPU tensors");
  }
  TORCH_CHECK(tile.device().is_cpu(), "entropy_state_update: expected CPU tensors");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tile.scalar_type(), "entropy_state_update_cpu", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* base = tile.const_data_ptr<scalar_t>();
    Acc *pm = m.mutable_data_ptr<Acc>(), *ps = s.mutable_data_ptr<Acc>(), *pw = w.mutable_data_ptr<Acc>();
    const Acc inv_t = static_cast<Acc>(1.0 / temperature);
    at::parallel_for(0, R, grain_rows(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const EntropyState<Acc> merged =
            cpu::merge(EntropyState<Acc>{pm[r], ps[r], pw[r]}, row_state(base + r * row_stride, V, inv_t), inv_t);
        pm[r] = merged.m;
        ps[r] = merged.s;
        pw[r] = merged.w;
      }
    });
  });
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_FRAGMENT(dpar_C, m) {
  m.def("token_entropy(Tensor logits, float temperature) -> Tensor");
  m.def("entropy_state_update(Tensor logits_tile, Tensor(a!) m, Tensor(b!) s, Tensor(c!) w, "
        "float temperature) -> ()");
}

TORCH_LIBRARY_IMPL(dpar_C, CPU, m) {
  m.impl("token_entropy", &dpar::token_entropy_cpu);
  m.impl("entropy_state_update", &dpar::entropy_state_update_cpu);
}
