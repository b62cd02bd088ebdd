// Torch-free tile math of the CPU flash attention (csrc/cpu/attention.cpp).
//
// Tiles are dense row-major buffers in the compute type T (float; double for float64 inputs). Rows of head-dim
// vectors have a padded length dp = padded_dim<T>(d) (a multiple of the SIMD width, padding zero):
//   q, dout [rows][dp]    query rows (q already multiplied by the softmax scale)
//   kt, vt  [d][kBlockK]  a key / value block transposed, columns [cols, cols rounded up to the SIMD width) zero
//   k, v    [cols][dp]    key / value rows (the *_rows_* entry points read scores from these: see row_scores)
//   s, p, ds [rows][kBlockK]   scores, probabilities, score gradients
// visible[i] (0..cols) is the number of leading keys of the block that query row i sees (causal mask).
// The math is written with GCC/clang vector extensions (64-byte vectors); the float entry points are compiled
// for AVX-512, AVX2+FMA and baseline x86-64 (target_clones, picked at load time).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace dpar::cpu::attention {

constexpr int kBlockQ = 32;  // query rows per work item
constexpr int kBlockK = 64;  // keys per tile
constexpr int kRowDotRows = 4;  // tiles of at most this many query rows take their scores from key rows

#if defined(__x86_64__) && defined(__GNUC__)
#define DPAR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPAR_SIMD_CLONES
#endif
#define DPAR_INLINE inline __attribute__((always_inline))
// 64-byte vectors passed by value between always-inline helpers of this one translation unit: the ABI note GCC
// emits for them (-Wpsabi, "AVX512F vector return without AVX512F enabled") concerns calls that never happen.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(64)));
  static constexpr int kWidth = 64 / sizeof(T);

  static DPAR_INLINE vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static DPAR_INLINE void store(T* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
  static DPAR_INLINE vec lane_index() {
    vec v;
    for (int i = 0; i < kWidth; ++i) v[i] = T(i);
    return v;
  }
};

template <typename T>
constexpr int64_t padded_dim(int64_t d) {
  return (d + Simd<T>::kWidth - 1) / Simd<T>::kWidth * Simd<T>::kWidth;
}

// exp(x) for x <= 0, lane-wise; exactly 0 for x < -87.3 (including -inf). Float: Cody-Waite range reduction to
// |r| <= ln2/2 and a degree-6 Taylor polynomial (relative error < 2e-7). Double: std::exp per lane.
DPAR_INLINE Simd<float>::vec exp_nonpositive(Simd<float>::vec x) {
  using vec = Simd<float>::vec;
  typedef int32_t ivec __attribute__((vector_size(64)));
  const vec clamped = x < -87.3f ? vec{} - 87.3f : x;
  const vec n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const vec r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vec poly = r * (1.f / 720.f) + 1.f / 120.f;
  poly = poly * r + 1.f / 24.f;
  poly = poly * r + 1.f / 6.f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.f;
  poly = poly * r + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return x < -87.3f ? vec{} : poly * two_to_n;
}
DPAR_INLINE Simd<double>::vec exp_nonpositive(Simd<double>::vec x) {
  for (int i = 0; i < Simd<double>::kWidth; ++i) x[i] = std::exp(x[i]);
  return x;
}
template <typename T>
DPAR_INLINE T exp_scalar(T x) {
  return exp_nonpositive(typename Simd<T>::vec{} + x)[0];
}

// Register tile of gemm_accumulate: rows [MR] x vectors [NV] of C.
template <typename T, int MR, int NV>
DPAR_INLINE void gemm_micro(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc,
                            int64_t depth) {
  using S = Simd<T>;
  typename S::vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = S::load(c + r * ldc + v * S::kWidth);
  for (int64_t k = 0; k < depth; ++k) {
    typename S::vec bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = S::load(b + k * ldb + v * S::kWidth);
    for (int r = 0; r < MR; ++r) {
      const T ark = a[r * a_row + k * a_col];
      for (int v = 0; v < NV; ++v) acc[r][v] += ark * bk[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) S::store(c + r * ldc + v * S::kWidth, acc[r][v]);
}

template <typename T, int MR>
DPAR_INLINE void gemm_rows(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c, int64_t ldc,
                           int64_t depth, int64_t vectors) {
  constexpr int W = Simd<T>::kWidth;
  int64_t v = 0;
  for (; v + 4 <= vectors; v += 4) gemm_micro<T, MR, 4>(a, a_row, a_col, b + v * W, ldb, c + v * W, ldc, depth);
  switch (vectors - v) {
    case 3: gemm_micro<T, MR, 3>(a, a_row, a_col, b + v * W, ldb, c + v * W, ldc, depth); break;
    case 2: gemm_micro<T, MR, 2>(a, a_row, a_col, b + v * W, ldb, c + v * W, ldc, depth); break;
    case 1: gemm_micro<T, MR, 1>(a, a_row, a_col, b + v * W, ldb, c + v * W, ldc, depth); break;
    default: break;
  }
}

// c[rows][vectors * W] += a[rows][depth] . b[depth][vectors * W]. Element (r, k) of a is a[r * a_row + k * a_col]
// (a_row = ld, a_col = 1 for row-major a; a_row = 1, a_col = ld for a transposed); b, c row-major.
template <typename T>
DPAR_INLINE void gemm_accumulate(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
                                 int64_t ldc, int64_t rows, int64_t depth, int64_t vectors) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    gemm_rows<T, 4>(a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc, depth, vectors);
  }
  const T* a_rest = a + r * a_row;
  T* c_rest = c + r * ldc;
  switch (rows - r) {
    case 3: gemm_rows<T, 3>(a_rest, a_row, a_col, b, ldb, c_rest, ldc, depth, vectors); break;
    case 2: gemm_rows<T, 2>(a_rest, a_row, a_col, b, ldb, c_rest, ldc, depth, vectors); break;
    case 1: gemm_rows<T, 1>(a_rest, a_row, a_col, b, ldb, c_rest, ldc, depth, vectors); break;
    default: break;
  }
}

// s[rows][0 : vectors * W] = x[rows][0:d] . t[0:d][same]   (x rows of length dp, t = a transposed block)
template <typename T>
DPAR_INLINE void block_scores(const T* x, int64_t rows, int64_t d, int64_t dp, const T* t, int64_t vectors, T* s) {
  std::fill(s, s + rows * kBlockK, T(0));
  gemm_accumulate(x, dp, 1, t, kBlockK, s, kBlockK, rows, d, vectors);
}

template <typename T>
DPAR_INLINE T horizontal_sum(typename Simd<T>::vec v) {
  constexpr int W = Simd<T>::kWidth;
  T lanes[W];
  Simd<T>::store(lanes, v);
  for (int half = W / 2; half > 0; half /= 2) {
    for (int k = 0; k < half; ++k) lanes[k] += lanes[k + half];
  }
  return lanes[0];
}

// s[rows][0 : cols] = x[rows][0:dp] . y[cols][0:dp] (row-major, padding zero), one dot product per (row, key);
// columns up to the next multiple of the SIMD width are zero. For tiles of few query rows (kRowDotRows): the
// products cost less than transposing the keys for block_scores.
template <typename T>
DPAR_INLINE void row_scores(const T* x, int64_t rows, int64_t dp, const T* y, int64_t cols, T* s) {
  using S = Simd<T>;
  constexpr int W = S::kWidth;
  const int64_t padded_cols = (cols + W - 1) / W * W;
  for (int64_t i = 0; i < rows; ++i) {
    const T* xi = x + i * dp;
    T* si = s + i * kBlockK;
    for (int64_t j = 0; j < cols; ++j) {
      const T* yj = y + j * dp;
      typename S::vec acc{};
      for (int64_t c = 0; c < dp; c += W) acc += S::load(xi + c) * S::load(yj + c);
      si[j] = horizontal_sum<T>(acc);
    }
    std::fill(si + cols, si + padded_cols, T(0));
  }
}

// Forward, one key block with its scores s [rows][kBlockK] (q . k, columns up to the SIMD rounding of cols
// finite): online-softmax update of the running row maximum m, row sum l and unnormalised output o [rows][dp].
template <typename T>
DPAR_INLINE void forward_update(int64_t rows, int64_t dp, const T* v, int64_t cols, const int* visible, T* s, T* m,
                                T* l, T* o) {
  using S = Simd<T>;
  constexpr int W = S::kWidth;
  const int64_t vectors = (cols + W - 1) / W;
  const typename S::vec lanes = S::lane_index();
  for (int64_t i = 0; i < rows; ++i) {
    T* si = s + i * kBlockK;
    const int n = visible[i];
    if (n == 0) {  // this row sees none of these keys: zero weights, state unchanged
      std::fill(si, si + cols, T(0));
      continue;
    }
    typename S::vec vmax = typename S::vec{} - std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < vectors * W; j += W) {
      const typename S::vec x = S::load(si + j);
      const auto hidden = lanes + T(j) >= T(n);
      const typename S::vec masked = hidden ? typename S::vec{} - std::numeric_limits<T>::infinity() : x;
      S::store(si + j, masked);
      vmax = masked > vmax ? masked : vmax;
    }
    T row_max = m[i];
    for (int k = 0; k < W; ++k) row_max = std::max(row_max, vmax[k]);
    typename S::vec vsum{};
    for (int64_t j = 0; j < vectors * W; j += W) {
      const typename S::vec e = exp_nonpositive(S::load(si + j) - row_max);
      S::store(si + j, e);
      vsum += e;
    }
    T row_sum = 0;
    for (int k = 0; k < W; ++k) row_sum += vsum[k];
    const T correction = exp_scalar(m[i] - row_max);  // 0 while m[i] is -inf
    m[i] = row_max;
    l[i] = l[i] * correction + row_sum;
    if (correction != T(1)) {
      T* oi = o + i * dp;
      for (int64_t c = 0; c < dp; c += W) S::store(oi + c, S::load(oi + c) * correction);
    }
  }
  gemm_accumulate(s, kBlockK, 1, v, dp, o, dp, rows, cols, dp / W);
}

// Forward, one key block: forward_update with s (scratch [rows][kBlockK]) = q . kt.
template <typename T>
DPAR_INLINE void forward_block(const T* q, int64_t rows, int64_t d, int64_t dp, const T* kt, const T* v,
                               int64_t cols, const int* visible, T* s, T* m, T* l, T* o) {
  constexpr int W = Simd<T>::kWidth;
  block_scores(q, rows, d, dp, kt, (cols + W - 1) / W, s);
  forward_update(rows, dp, v, cols, visible, s, m, l, o);
}

// Backward, one tile from its scores p = S = q . k and ds = dP = dout . v (columns up to the SIMD rounding of
// cols finite), in place: p = P = exp(S - lse) and ds = P * (dP - delta), both zero where the key is hidden.
template <typename T>
DPAR_INLINE void backward_from_scores(int64_t rows, int64_t cols, const int* visible, const T* lse, const T* delta,
                                      T* p, T* ds) {
  using S = Simd<T>;
  constexpr int W = S::kWidth;
  const int64_t vectors = (cols + W - 1) / W;
  const typename S::vec lanes = S::lane_index();
  for (int64_t i = 0; i < rows; ++i) {
    T* pi = p + i * kBlockK;
    T* dsi = ds + i * kBlockK;
    const int n = visible[i];  // 0 for a row whose lse is -inf: it sees no key at all
    for (int64_t j = 0; j < vectors * W; j += W) {
      const auto hidden = lanes + T(j) >= T(n);
      const typename S::vec prob = exp_nonpositive(S::load(pi + j) - (n > 0 ? lse[i] : T(0)));
      const typename S::vec masked = hidden ? typename S::vec{} : prob;
      S::store(pi + j, masked);
      S::store(dsi + j, masked * (S::load(dsi + j) - delta[i]));
    }
  }
}

// Backward, one (query block, key block) tile: backward_from_scores on the scores of kt and vt.
template <typename T>
DPAR_INLINE void backward_probabilities(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt,
                                        const T* vt, int64_t cols, const int* visible, const T* lse,
                                        const T* delta, T* p, T* ds) {
  constexpr int W = Simd<T>::kWidth;
  const int64_t vectors = (cols + W - 1) / W;
  block_scores(q, rows, d, dp, kt, vectors, p);
  block_scores(dout, rows, d, dp, vt, vectors, ds);
  backward_from_scores(rows, cols, visible, lse, delta, p, ds);
}

// Backward, the three products of one tile from its p and ds: dv += P^T dout, dk += dS^T q, dq += dS k.
template <typename T>
DPAR_INLINE void backward_products(const T* q, const T* dout, int64_t rows, int64_t dp, const T* k, int64_t cols,
                                   const T* p, const T* ds, T* dq, T* dk, T* dv) {
  constexpr int W = Simd<T>::kWidth;
  gemm_accumulate(p, 1, kBlockK, dout, dp, dv, dp, cols, rows, dp / W);  // P^T: element (j, i) is p[i][j]
  gemm_accumulate(ds, 1, kBlockK, q, dp, dk, dp, cols, rows, dp / W);
  gemm_accumulate(ds, kBlockK, 1, k, dp, dq, dp, rows, cols, dp / W);
}

// Backward, dK/dV side of one tile: dv += P^T dout, dk += dS^T q (q pre-scaled, so dk needs no extra scale).
template <typename T>
DPAR_INLINE void backward_key_block(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt,
                                    const T* vt, int64_t cols, const int* visible, const T* lse, const T* delta,
                                    T* p, T* ds, T* dk, T* dv) {
  constexpr int W = Simd<T>::kWidth;
  backward_probabilities(q, dout, rows, d, dp, kt, vt, cols, visible, lse, delta, p, ds);
  gemm_accumulate(p, 1, kBlockK, dout, dp, dv, dp, cols, rows, dp / W);  // P^T: element (j, i) is p[i][j]
  gemm_accumulate(ds, 1, kBlockK, q, dp, dk, dp, cols, rows, dp / W);
}

// Backward, dQ side of one tile: dq += dS k (the caller multiplies by the softmax scale at the end).
template <typename T>
DPAR_INLINE void backward_query_block(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt,
                                      const T* vt, const T* k, int64_t cols, const int* visible, const T* lse,
                                      const T* delta, T* p, T* ds, T* dq) {
  constexpr int W = Simd<T>::kWidth;
  backward_probabilities(q, dout, rows, d, dp, kt, vt, cols, visible, lse, delta, p, ds);
  gemm_accumulate(ds, kBlockK, 1, k, dp, dq, dp, rows, cols, dp / W);
}

// Backward, both sides of one tile in one pass: dv += P^T dout, dk += dS^T q, dq += dS k (dq unscaled, as in
// backward_query_block).
template <typename T>
DPAR_INLINE void backward_fused_block(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt,
                                      const T* vt, const T* k, int64_t cols, const int* visible, const T* lse,
                                      const T* delta, T* p, T* ds, T* dq, T* dk, T* dv) {
  backward_probabilities(q, dout, rows, d, dp, kt, vt, cols, visible, lse, delta, p, ds);
  backward_products(q, dout, rows, dp, k, cols, p, ds, dq, dk, dv);
}

// Short tiles (rows <= kRowDotRows): the forward and fused backward steps with scores from key and value rows
// k, v [cols][dp] (no transposed blocks).
template <typename T>
DPAR_INLINE void forward_rows_block(const T* q, int64_t rows, int64_t dp, const T* k, const T* v, int64_t cols,
                                    const int* visible, T* s, T* m, T* l, T* o) {
  row_scores(q, rows, dp, k, cols, s);
  forward_update(rows, dp, v, cols, visible, s, m, l, o);
}

template <typename T>
DPAR_INLINE void backward_fused_rows_block(const T* q, const T* dout, int64_t rows, int64_t dp, const T* k,
                                           const T* v, int64_t cols, const int* visible, const T* lse,
                                           const T* delta, T* p, T* ds, T* dq, T* dk, T* dv) {
  row_scores(q, rows, dp, k, cols, p);
  row_scores(dout, rows, dp, v, cols, ds);
  backward_from_scores(rows, cols, visible, lse, delta, p, ds);
  backward_products(q, dout, rows, dp, k, cols, p, ds, dq, dk, dv);
}

// Entry points: float versions compiled per instruction set, double versions plain.
DPAR_SIMD_CLONES static void forward_tile(const float* q, int64_t rows, int64_t d, int64_t dp, const float* kt,
                                          const float* v, int64_t cols, const int* visible, float* s, float* m,
                                          float* l, float* o) {
  forward_block(q, rows, d, dp, kt, v, cols, visible, s, m, l, o);
}
static void forward_tile(const double* q, int64_t rows, int64_t d, int64_t dp, const double* kt, const double* v,
                         int64_t cols, const int* visible, double* s, double* m, double* l, double* o) {
  forward_block(q, rows, d, dp, kt, v, cols, visible, s, m, l, o);
}

DPAR_SIMD_CLONES static void backward_key_tile(const float* q, const float* dout, int64_t rows, int64_t d,
                                               int64_t dp, const float* kt, const float* vt, int64_t cols,
                                               const int* visible, const float* lse, const float* delta, float* p,
                                               float* ds, float* dk, float* dv) {
  backward_key_block(q, dout, rows, d, dp, kt, vt, cols, visible, lse, delta, p, ds, dk, dv);
}
static void backward_key_tile(const double* q, const double* dout, int64_t rows, int64_t d, int64_t dp,
                              const double* kt, const double* vt, int64_t cols, const int* visible,
                              const double* lse, const double* delta, double* p, double* ds, double* dk,
                              double* dv) {
  backward_key_block(q, dout, rows, d, dp, kt, vt, cols, visible, lse, delta, p, ds, dk, dv);
}

DPAR_SIMD_CLONES static void backward_query_tile(const float* q, const float* dout, int64_t rows, int64_t d,
                                                 int64_t dp, const float* kt, const float* vt, const float* k,
                                                 int64_t cols, const int* visible, const float* lse,
                                                 const float* delta, float* p, float* ds, float* dq) {
  backward_query_block(q, dout, rows, d, dp, kt, vt, k, cols, visible, lse, delta, p, ds, dq);
}
static void backward_query_tile(const double* q, const double* dout, int64_t rows, int64_t d, int64_t dp,
                                const double* kt, const double* vt, const double* k, int64_t cols,
                                const int* visible, const double* lse, const double* delta, double* p, double* ds,
                                double* dq) {
  backward_query_block(q, dout, rows, d, dp, kt, vt, k, cols, visible, lse, delta, p, ds, dq);
}

DPAR_SIMD_CLONES static void backward_fused_tile(const float* q, const float* dout, int64_t rows, int64_t d,
                                                 int64_t dp, const float* kt, const float* vt, const float* k,
                                                 int64_t cols, const int* visible, const float* lse,
                                                 const float* delta, float* p, float* ds, float* dq, float* dk,
                                                 float* dv) {
  backward_fused_block(q, dout, rows, d, dp, kt, vt, k, cols, visible, lse, delta, p, ds, dq, dk, dv);
}
static void backward_fused_tile(const double* q, const double* dout, int64_t rows, int64_t d, int64_t dp,
                                const double* kt, const double* vt, const double* k, int64_t cols,
                                const int* visible, const double* lse, const double* delta, double* p, double* ds,
                                double* dq, double* dk, double* dv) {
  backward_fused_block(q, dout, rows, d, dp, kt, vt, k, cols, visible, lse, delta, p, ds, dq, dk, dv);
}

DPAR_SIMD_CLONES static void forward_rows_tile(const float* q, int64_t rows, int64_t dp, const float* k,
                                               const float* v, int64_t cols, const int* visible, float* s, float* m,
                                               float* l, float* o) {
  forward_rows_block(q, rows, dp, k, v, cols, visible, s, m, l, o);
}
static void forward_rows_tile(const double* q, int64_t rows, int64_t dp, const double* k, const double* v,
                              int64_t cols, const int* visible, double* s, double* m, double* l, double* o) {
  forward_rows_block(q, rows, dp, k, v, cols, visible, s, m, l, o);
}

DPAR_SIMD_CLONES static void backward_fused_rows_tile(const float* q, const float* dout, int64_t rows, int64_t dp,
                                                      const float* k, const float* v, int64_t cols,
                                                      const int* visible, const float* lse, const float* delta,
                                                      float* p, float* ds, float* dq, float* dk, float* dv) {
  backward_fused_rows_block(q, dout, rows, dp, k, v, cols, visible, lse, delta, p, ds, dq, dk, dv);
}
static void backward_fused_rows_tile(const double* q, const double* dout, int64_t rows, int64_t dp, const double* k,
                                     const double* v, int64_t cols, const int* visible, const double* lse,
                                     const double* delta, double* p, double* ds, double* dq, double* dk, double* dv) {
  backward_fused_rows_block(q, dout, rows, dp, k, v, cols, visible, lse, delta, p, ds, dq, dk, dv);
}

}  // namespace dpar::cpu::attention
