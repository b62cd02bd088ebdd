// CPU kernels of the entropy family.
//   token_entropy(logits [N, V], temperature) -> entropy [N] (float32; float64 for float64 logits)
//   entropy_state_update(tile [R, v], m [R], s [R], w [R], temperature): merges one vocabulary tile into the running
//     state (m = max logit, s = sum exp((z-m)/T), w = sum ((z-m)/T) exp((z-m)/T)) used by linear_entropy.
// One pass over each row: LANES independent online states, updated once per block of BLOCK values (max of the block
// first, one rescale per lane per block), merged at the end of the row. Entropy = log s - w / s.
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
#include <cstring>
#include <limits>

namespace dpar {
namespace {

constexpr int64_t LANES = 16;                // independent states: one AVX-512 register of float
constexpr int64_t VECTORS_PER_BLOCK = 4;     // block = 64 values: one max + one rescale per lane per block
constexpr int64_t BLOCK = LANES * VECTORS_PER_BLOCK;

// exp(x) for x <= 0 in float, written so that GCC vectorises it (Cody-Waite reduction + degree-6 polynomial,
// ~2 ulp). Results below the smallest normal float (x < -87.3) are flushed to 0; NaN stays NaN.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float xc = std::max(x, -87.0f);
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(c10::Half x) { return static_cast<float>(x); }
inline float load(c10::BFloat16 x) { return static_cast<float>(x); }

// Online entropy state of a set of scaled logits: m = max raw logit, s = sum e, w = sum t e with
// t = (z - m) * inv_t and e = exp(t). An empty state has m = -inf, s = w = 0.
template <typename Acc>
struct State {
  Acc m, s, w;
};

// Merges state b into a; both may be empty. Shifting s by d = (m_old - m_new) * inv_t multiplies it by exp(d) and
// adds d to every t of w.
template <typename Acc>
inline State<Acc> merge(State<Acc> a, State<Acc> b, Acc inv_t) {
  const Acc m = std::max(a.m, b.m);
  if (m == -std::numeric_limits<Acc>::infinity()) return a;
  auto shifted = [&](State<Acc> x) -> State<Acc> {
    if (x.s == Acc(0)) return {m, Acc(0), Acc(0)};
    const Acc d = (x.m - m) * inv_t;
    const Acc scale = std::exp(d);
    return {m, scale * x.s, scale * (x.w + d * x.s)};
  };
  const State<Acc> sa = shifted(a), sb = shifted(b);
  return {m, sa.s + sb.s, sa.w + sb.w};
}

// One row of V values (unit stride) -> its state. Inlined into the per-dtype, per-ISA clones below.
template <typename T, typename Acc>
__attribute__((always_inline)) inline State<Acc> row_state(const T* row, int64_t V, Acc inv_t) {
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  constexpr Acc kLowest = std::numeric_limits<Acc>::lowest();
  Acc m[LANES], s[LANES], w[LANES];
  for (int64_t l = 0; l < LANES; ++l) {
    m[l] = kNegInf;
    s[l] = Acc(0);
    w[l] = Acc(0);
  }
  Acc x[VECTORS_PER_BLOCK][LANES];
  for (int64_t start = 0; start < V; start += BLOCK) {
    const int64_t valid = std::min(BLOCK, V - start);
    if (valid == BLOCK) {
      for (int64_t k = 0; k < VECTORS_PER_BLOCK; ++k)
        for (int64_t l = 0; l < LANES; ++l) x[k][l] = load(row[start + k * LANES + l]);
    } else {  // the tail block, padded with -inf (contributes nothing)
      for (int64_t k = 0; k < VECTORS_PER_BLOCK; ++k)
        for (int64_t l = 0; l < LANES; ++l) {
          const int64_t i = k * LANES + l;
          x[k][l] = i < valid ? load(row[start + i]) : kNegInf;
        }
    }
    Acc block_max[LANES];
    for (int64_t l = 0; l < LANES; ++l) block_max[l] = x[0][l];
    for (int64_t k = 1; k < VECTORS_PER_BLOCK; ++k)
      for (int64_t l = 0; l < LANES; ++l) block_max[l] = std::max(block_max[l], x[k][l]);
    Acc pivot[LANES];
    for (int64_t l = 0; l < LANES; ++l) {
      const Acc m_new = std::max(m[l], block_max[l]);
      // A lane that has only seen -inf keeps pivot 0 so that no inf - inf appears; its s and w stay 0.
      pivot[l] = m_new == kNegInf ? Acc(0) : m_new;
      const Acc d = std::max((m[l] - pivot[l]) * inv_t, kLowest);  // -inf (empty lane) -> lowest: exp gives 0
      const Acc scale = exp_nonpositive(d);
      w[l] = scale * (w[l] + d * s[l]);
      s[l] = scale * s[l];
      m[l] = m_new;
    }
    for (int64_t k = 0; k < VECTORS_PER_BLOCK; ++k)
      for (int64_t l = 0; l < LANES; ++l) {
        const Acc t = std::max((x[k][l] - pivot[l]) * inv_t, kLowest);  // -inf logit: e = 0, t e = 0
        const Acc e = exp_nonpositive(t);
        s[l] += e;
        w[l] += e == Acc(0) ? Acc(0) : t * e;
      }
  }
  State<Acc> total{kNegInf, Acc(0), Acc(0)};
  for (int64_t l = 0; l < LANES; ++l) total = merge(total, State<Acc>{m[l], s[l], w[l]}, inv_t);
  return total;
}

// Per-dtype entry points, cloned per ISA (resolved once at load time) so the inner loops use AVX2/AVX-512 where
// the CPU has them although the extension is compiled for baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DPAR_ISA_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define DPAR_ISA_CLONES
#endif

DPAR_ISA_CLONES State<float> row_state_f32(const float* row, int64_t V, float inv_t) {
  return row_state<float, float>(row, V, inv_t);
}
DPAR_ISA_CLONES State<float> row_state_f16(const c10::Half* row, int64_t V, float inv_t) {
  return row_state<c10::Half, float>(row, V, inv_t);
}
DPAR_ISA_CLONES State<float> row_state_bf16(const c10::BFloat16* row, int64_t V, float inv_t) {
  return row_state<c10::BFloat16, float>(row, V, inv_t);
}
State<double> row_state_f64(const double* row, int64_t V, double inv_t) {
  return row_state<double, double>(row, V, inv_t);
}

inline State<float> row_state_any(const float* row, int64_t V, float inv_t) { return row_state_f32(row, V, inv_t); }
inline State<float> row_state_any(const c10::Half* row, int64_t V, float inv_t) {
  return row_state_f16(row, V, inv_t);
}
inline State<float> row_state_any(const c10::BFloat16* row, int64_t V, float inv_t) {
  return row_state_bf16(row, V, inv_t);
}
inline State<double> row_state_any(const double* row, int64_t V, double inv_t) {
  return row_state_f64(row, V, inv_t);
}

template <typename Acc>
inline Acc entropy_of(State<Acc> st) {
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
      for (int64_t r = begin; r < end; ++r) dst[r] = entropy_of(row_state_any(base + r * row_stride, V, inv_t));
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
        const State<Acc> merged =
            merge(State<Acc>{pm[r], ps[r], pw[r]}, row_state_any(base + r * row_stride, V, inv_t), inv_t);
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
