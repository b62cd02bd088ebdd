// KV-cache attention for incremental decoding: schema + CPU kernel (flash_attn_with_kvcache layout).
//
// q [B, Sq, Hq, d]; k_cache, v_cache [B, S_max, Hk, d] (any strides, contiguous last dim), updated in place when
// k, v [B, Sq, Hk, d] are given; cache_seqlens int32 [B]. Semantics exactly as dpar_kernels/kvcache/naive.py:
// the cached length is clamped to [0, S_max], new keys go to positions cached + i below S_max (others dropped),
// query i sees keys [0, end_i) with end_i = min(S_max, cached + new - Sq + i + 1) when causal (min(S_max,
// cached + new) otherwise). A query that sees no key outputs 0. Returns out [B, Sq, Hq, d] in q's dtype.
//
// One work unit per (row b, kv head): it writes that head's new keys, then reads each of its keys once for all
// Hq / Hk * Sq query rows of the group: scores (16 keys at a time in the SIMD lanes), an exact two-pass softmax
// per row, then out += p * v on register accumulators. Keys and values are read in place when they are float32
// rows of a multiple of the SIMD width, else converted once into a padded buffer. Units own their output rows:
// no atomics, deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// Only the SIMD helpers of attention_tiles.h are used here; its static tile entry points are not.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-function"
#endif
#include "cpu/attention_tiles.h"
#include "cpu/simd_fold.h"

namespace dpar {
namespace {

using cpu::attention::padded_dim;
using cpu::attention::Simd;
using cpu::transpose_sum;

// Multiply-adds below which waking another thread costs more than it saves (a wake-up is tens of microseconds on a
// loaded machine); a call below it runs inline on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 19;

// Column groups: a row of dp values is split into groups of up to kMaxGroup SIMD vectors, each handled by code
// specialised for its vector count (d 16 or 64 in float32: one group of 1 or 4 vectors).
constexpr int kMaxGroup = 8;
// Bytes of value rows the PV pass streams per chunk before it revisits the other query rows (fits in L1).
constexpr int64_t kChunkBytes = 16 << 10;

// Lane i: q . key i over G vectors of columns (q and each key row start at the group's first column).
template <typename T, int G>
DPAR_INLINE typename Simd<T>::vec block_dots(const T* q, const T* k, int64_t k_stride) {
  using S = Simd<T>;
  constexpr int W = S::kWidth;
  typename S::vec qv[G], dots[W];
  for (int c = 0; c < G; ++c) qv[c] = S::load(q + c * W);
  for (int i = 0; i < W; ++i) {
    const T* ki = k + i * k_stride;
    typename S::vec dot = qv[0] * S::load(ki);
    for (int c = 1; c < G; ++c) dot += qv[c] * S::load(ki + c * W);
    dots[i] = dot;
  }
  return transpose_sum<T>(dots);
}

// acc[0 : G * W] += sum_j p[j] * v row j, j < n, over independent accumulator chains (FMA latency).
template <typename T, int G>
DPAR_INLINE void add_values(const T* p, const T* v, int64_t v_stride, int64_t n, T* acc) {
  using S = Simd<T>;
  constexpr int W = S::kWidth, kChains = std::clamp(8 / G, 1, 4);  // up to 8 accumulators in flight
  typename S::vec sum[kChains][G];
  for (int u = 0; u < kChains; ++u)
    for (int c = 0; c < G; ++c) sum[u][c] = u == 0 ? S::load(acc + c * W) : typename S::vec{};
  int64_t j = 0;
  for (; j + kChains <= n; j += kChains) {
    for (int u = 0; u < kChains; ++u) {
      const T pj = p[j + u];
      const T* vj = v + (j + u) * v_stride;
      for (int c = 0; c < G; ++c) sum[u][c] += pj * S::load(vj + c * W);
    }
  }
  for (; j < n; ++j) {
    for (int c = 0; c < G; ++c) sum[0][c] += p[j] * S::load(v + j * v_stride + c * W);
  }
  for (int u = 1; u < kChains; ++u)
    for (int c = 0; c < G; ++c) sum[0][c] += sum[u][c];
  for (int c = 0; c < G; ++c) S::store(acc + c * W, sum[0][c]);
}

// Calls f(std::integral_constant<int, G>{}, first vector) for each column group of a row of `vectors` vectors.
template <typename F>
DPAR_INLINE void for_each_group(int64_t vectors, F&& f) {
  int64_t c = 0;
  for (; c + kMaxGroup <= vectors; c += kMaxGroup) f(std::integral_constant<int, kMaxGroup>{}, c);
  switch (vectors - c) {
    case 1: f(std::integral_constant<int, 1>{}, c); break;
    case 2: f(std::integral_constant<int, 2>{}, c); break;
    case 3: f(std::integral_constant<int, 3>{}, c); break;
    case 4: f(std::integral_constant<int, 4>{}, c); break;
    case 5: f(std::integral_constant<int, 5>{}, c); break;
    case 6: f(std::integral_constant<int, 6>{}, c); break;
    case 7: f(std::integral_constant<int, 7>{}, c); break;
    default: break;
  }
}

// The math of one unit. q [rows][dp] (pre-scaled, padding zero); k, v: `keys` rows of dp values (padding zero) at
// k_stride / v_stride; ends[r]: keys row r sees (<= keys); s scratch [rows][ld_s], ld_s >= keys rounded up to W;
// tail scratch [W][dp]; norm scratch [rows]; acc [rows][dp] -> the normalised outputs (0 for a row that sees no
// key). Pass 1: scores of W keys at a time, one key per lane (key block outer, so it is read once from memory for
// all rows), hidden keys -inf; pass 2: exact softmax per row; pass 3: acc += p v over each row's visible keys only,
// chunk by chunk of values. Only rows j < keys of k and j < ends[r] of v are ever read.
template <typename T>
DPAR_INLINE void decode_rows(const T* q, int64_t rows, int64_t dp, const T* k, int64_t k_stride, const T* v,
                             int64_t v_stride, int64_t keys, const int64_t* ends, T* s, int64_t ld_s, T* tail,
                             T* norm, T* acc) {
  using S = Simd<T>;
  using vec = typename S::vec;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I ivec __attribute__((vector_size(64)));
  constexpr int W = S::kWidth;
  const int64_t vectors = dp / W;
  ivec lanes;
  for (int i = 0; i < W; ++i) lanes[i] = i;
  const vec minus_inf = vec{} - std::numeric_limits<T>::infinity();
  for (int64_t j0 = 0; j0 < keys; j0 += W) {
    const T* kb = k + j0 * k_stride;
    int64_t kb_stride = k_stride;
    if (keys - j0 < W) {  // the last, partial block: its keys copied into zero-padded scratch rows
      std::fill(tail, tail + W * dp, T(0));
      for (int64_t i = 0; i < keys - j0; ++i) std::copy_n(kb + i * k_stride, dp, tail + i * dp);
      kb = tail;
      kb_stride = dp;
    }
    for (int64_t r = 0; r < rows; ++r) {
      vec scores{};
      for_each_group(vectors, [&](auto group, int64_t c) __attribute__((always_inline)) {
        scores += block_dots<T, decltype(group)::value>(q + r * dp + c * W, kb + c * W, kb_stride);
      });
      const I visible = static_cast<I>(std::clamp<int64_t>(ends[r] - j0, 0, W));
      S::store(s + r * ld_s + j0, lanes < visible ? scores : minus_inf);
    }
  }
  std::fill(acc, acc + rows * dp, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * ld_s;
    const int64_t n = ends[r], padded = (n + W - 1) / W * W;
    vec top_lanes = minus_inf;
    for (int64_t j = 0; j < padded; j += W) {
      const vec x = S::load(sr + j);
      top_lanes = x > top_lanes ? x : top_lanes;
    }
    T top = -std::numeric_limits<T>::infinity();
    for (int i = 0; i < W; ++i) top = std::max(top, top_lanes[i]);
    vec total{};
    for (int64_t j = 0; j < padded; j += W) {
      const vec e = cpu::attention::exp_nonpositive(S::load(sr + j) - top);
      S::store(sr + j, e);
      total += e;
    }
    T sum = 0;
    for (int i = 0; i < W; ++i) sum += total[i];
    norm[r] = n > 0 ? T(1) / sum : T(0);
  }
  const int64_t chunk = std::max<int64_t>(W, kChunkBytes / static_cast<int64_t>(std::max<int64_t>(dp, W) * sizeof(T)));
  for (int64_t c0 = 0; c0 < keys; c0 += chunk) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = std::min(ends[r], c0 + chunk) - c0;
      if (n <= 0) continue;
      for_each_group(vectors, [&](auto group, int64_t c) __attribute__((always_inline)) {
        add_values<T, decltype(group)::value>(s + r * ld_s + c0, v + c0 * v_stride + c * W, v_stride, n,
                                              acc + r * dp + c * W);
      });
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < dp; c += W) S::store(acc + r * dp + c, S::load(acc + r * dp + c) * norm[r]);
  }
}

DPAR_SIMD_CLONES void decode_unit(const float* q, int64_t rows, int64_t dp, const float* k, int64_t k_stride,
                                  const float* v, int64_t v_stride, int64_t keys, const int64_t* ends, float* s,
                                  int64_t ld_s, float* tail, float* norm, float* acc) {
  decode_rows(q, rows, dp, k, k_stride, v, v_stride, keys, ends, s, ld_s, tail, norm, acc);
}
void decode_unit(const double* q, int64_t rows, int64_t dp, const double* k, int64_t k_stride, const double* v,
                 int64_t v_stride, int64_t keys, const int64_t* ends, double* s, int64_t ld_s, double* tail,
                 double* norm, double* acc) {
  decode_rows(q, rows, dp, k, k_stride, v, v_stride, keys, ends, s, ld_s, tail, norm, acc);
}

void check_float4d(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, "kvcache_attention: ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), "kvcache_attention: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "kvcache_attention: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "kvcache_attention: ", name, " must have a contiguous last dim");
}

// Rows (batch, position, head) of a [B, S, H, d] tensor.
template <typename T>
struct Rows4d {
  T* data;
  int64_t sb, ss, sh;
  explicit Rows4d(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)) {}
  T* row(int64_t b, int64_t s, int64_t h) const { return data + b * sb + s * ss + h * sh; }
};

template <typename scalar_t>
void kvcache_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const int32_t* cache_seqlens, const std::optional<at::Tensor>& k,
                    const std::optional<at::Tensor>& v, double softmax_scale, bool causal, const at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2), d = q.size(3);
  const int64_t max_keys = k_cache.size(1), heads_kv = k_cache.size(2), group = heads_q / heads_kv;
  const int64_t rows = group * seqlen_q, dp = padded_dim<acc_t>(d);
  const bool appended = k.has_value();
  // float32 caches whose rows are whole SIMD vectors are read in place
  const bool in_place = std::is_same_v<scalar_t, acc_t> && dp == d;
  const Rows4d<const scalar_t> q_rows(q);
  const Rows4d<scalar_t> k_rows(k_cache), v_rows(v_cache), out_rows(out);
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  const int64_t units = batch * heads_kv;
  const int64_t threads = std::clamp<int64_t>(units * rows * max_keys * d / kMinWorkPerThread, 1,
                                              std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(units, 1)));

  auto work = [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(rows * dp, acc_t(0)), acc(rows * dp), tail(Simd<acc_t>::kWidth * dp), norm(rows), s,
        kbuf, vbuf;
    std::vector<int64_t> ends(rows);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / heads_kv, h = unit % heads_kv;
      const int64_t cached = std::clamp<int64_t>(cache_seqlens[b], 0, max_keys);
      if (appended) {
        const Rows4d<const scalar_t> k_new(*k), v_new(*v);
        for (int64_t i = 0; i < seqlen_q && cached + i < max_keys; ++i) {
          std::copy_n(k_new.row(b, i, h), d, k_rows.row(b, cached + i, h));
          std::copy_n(v_new.row(b, i, h), d, v_rows.row(b, cached + i, h));
        }
      }
      const int64_t total = cached + (appended ? seqlen_q : 0);
      int64_t keys = 0;
      for (int64_t r = 0; r < rows; ++r) {  // row r = g * Sq + i: query i of query head h * group + g
        const int64_t i = r % seqlen_q;
        ends[r] = std::clamp<int64_t>(causal ? total - seqlen_q + i + 1 : total, 0, max_keys);
        keys = std::max(keys, ends[r]);
        const scalar_t* src = q_rows.row(b, i, h * group + r / seqlen_q);
        for (int64_t c = 0; c < d; ++c) qs[r * dp + c] = static_cast<acc_t>(src[c]) * scale;
      }
      const int64_t ld_s = padded_dim<acc_t>(keys);
      if (static_cast<int64_t>(s.size()) < rows * ld_s) s.resize(rows * ld_s);
      const acc_t *kp, *vp;
      int64_t k_stride, v_stride;
      if (in_place) {
        kp = reinterpret_cast<const acc_t*>(k_rows.row(b, 0, h));
        vp = reinterpret_cast<const acc_t*>(v_rows.row(b, 0, h));
        k_stride = k_rows.ss;
        v_stride = v_rows.ss;
      } else {
        if (static_cast<int64_t>(kbuf.size()) < keys * dp) {
          kbuf.assign(keys * dp, acc_t(0));  // padding columns stay zero
          vbuf.assign(keys * dp, acc_t(0));
        }
        for (int64_t j = 0; j < keys; ++j) {
          const scalar_t *kr = k_rows.row(b, j, h), *vr = v_rows.row(b, j, h);
          for (int64_t c = 0; c < d; ++c) {
            kbuf[j * dp + c] = static_cast<acc_t>(kr[c]);
            vbuf[j * dp + c] = static_cast<acc_t>(vr[c]);
          }
        }
        kp = kbuf.data();
        vp = vbuf.data();
        k_stride = v_stride = dp;
      }
      decode_unit(qs.data(), rows, dp, kp, k_stride, vp, v_stride, keys, ends.data(), s.data(), ld_s, tail.data(),
                  norm.data(), acc.data());
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* dst = out_rows.row(b, r % seqlen_q, h * group + r / seqlen_q);
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(acc[r * dp + c]);
      }
    }
  };
  if (threads == 1) {
    work(0, units);
  } else {
    at::parallel_for(0, units, (units + threads - 1) / threads, work);
  }
}

at::Tensor kvcache_attention_cpu(const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache,
                                 const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_in,
                                 const std::optional<at::Tensor>& v_in, double softmax_scale, bool causal) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.device().is_cpu(), "kvcache_attention: q must be a 4-D CPU tensor");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "kvcache_attention: q must be float32, float16, bfloat16 or float64, got ", dtype);
  const at::Tensor q = q_in.size(3) <= 1 || q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  check_float4d(k_cache, "k_cache", q);
  check_float4d(v_cache, "v_cache", q);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), d = q.size(3);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "kvcache_attention: k_cache and v_cache must have the same shape");
  TORCH_CHECK(k_cache.size(0) == batch && k_cache.size(3) == d,
              "kvcache_attention: k_cache must be [B, S_max, Hk, d] with q's B and d, got ", k_cache.sizes());
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(2) % k_cache.size(2) == 0,
              "kvcache_attention: the number of query heads must be a multiple of k_cache's heads");
  TORCH_CHECK(k_in.has_value() == v_in.has_value(), "kvcache_attention: k and v must be given together");
  std::optional<at::Tensor> k, v;
  if (k_in.has_value()) {
    k = k_in->size(3) <= 1 || k_in->stride(3) == 1 ? *k_in : k_in->contiguous();
    v = v_in->size(3) <= 1 || v_in->stride(3) == 1 ? *v_in : v_in->contiguous();
    check_float4d(*k, "k", q);
    check_float4d(*v, "v", q);
    const std::vector<int64_t> expected{batch, seqlen_q, k_cache.size(2), d};
    TORCH_CHECK(k->sizes() == expected && v->sizes() == expected, "kvcache_attention: k and v must be ", expected);
  }
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.numel() == batch && cache_seqlens.scalar_type() == at::kInt &&
                  cache_seqlens.device().is_cpu(),
              "kvcache_attention: cache_seqlens must be a CPU int32 tensor [B]");
  const at::Tensor lengths = cache_seqlens.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kvcache_attention_cpu", [&] {
    kvcache_kernel<scalar_t>(q, k_cache, v_cache, lengths.data_ptr<int32_t>(), k, v, softmax_scale, causal, out);
  });
  return out;
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_FRAGMENT(dpar_C, m) {
  m.def(
      "kvcache_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k, "
      "Tensor? v, float softmax_scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpar_C, CPU, m) { m.impl("kvcache_attention", &dpar::kvcache_attention_cpu); }
