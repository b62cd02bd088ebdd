// KV-cache attention for incremental decoding: schema + CPU kernel (flash_attn_with_kvcache layout).
//
// q [B, Sq, Hq, d]; k_cache, v_cache [B, S_max, Hk, d] (any strides, contiguous last dim), updated in place when
// k, v [B, Sq, Hk, d] are given; cache_seqlens int32 [B]. Semantics exactly as dpar_kernels/kvcache/naive.py:
// the cached length is clamped to [0, S_max], new keys go to positions cached + i below S_max (others dropped),
// query i sees keys [0, end_i) with end_i = min(S_max, cached + new - Sq + i + 1) when causal (min(S_max,
// cached + new) otherwise). A query that sees no key outputs 0. Returns out [B, Sq, Hq, d] in q's dtype.
//
// One work unit per (row b, kv head): it writes that head's new keys, then reads each of its keys once for all
// Hq / Hk * Sq query rows of the group (the math: cpu/kernels/kvcache.inc, on the active instruction-set path). Keys
// and values are read in place when they are float32 rows of a multiple of the widest vector, else converted once
// into a padded buffer. Units own their output rows: no atomics, deterministic.
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

#include "cpu/isa.h"
#include "cpu/kernels/tables.h"

namespace dpar {
namespace {

using cpu::padded_len;

// Multiply-adds below which waking another thread costs more than it saves (a wake-up is tens of microseconds on a
// loaded machine); a call below it runs inline on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 19;

// The decode math of one unit on the active instruction-set path (cpu/isa.h, cpu/kernels/kvcache.inc).
inline cpu::DecodeUnit<float> decode_unit(float) { return cpu::kvcache_kernels().f32; }
inline cpu::DecodeUnit<double> decode_unit(double) { return cpu::kvcache_kernels().f64; }

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
  const int64_t rows = group * seqlen_q, dp = padded_len<acc_t>(d);
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
    std::vector<acc_t> qs(rows * dp, acc_t(0)), acc(rows * dp), tail(cpu::kMaxVectorBytes / sizeof(acc_t) * dp), norm(rows), s,
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
      const int64_t ld_s = padded_len<acc_t>(keys);
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
      decode_unit(acc_t{})(qs.data(), rows, dp, kp, k_stride, vp, v_stride, keys, ends.data(), s.data(), ld_s,
                           tail.data(), norm.data(), acc.data());
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
