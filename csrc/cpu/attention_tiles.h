// Torch-free tile math of the CPU flash attention (csrc/cpu/attention.cpp).
//
// All tiles are dense row-major buffers in the compute type T (float, or double for float64 inputs):
//   q  [rows][d]  query rows, already multiplied by the softmax scale
//   kt [d][kBlockK]  a key (or value) block transposed, columns >= cols zero-padded
//   s  [rows][kBlockK]  scores / probabilities
//   x  [cols][d]  key or value rows
// visible[i] is the number of leading columns of the block that query row i may see (causal mask), 0..cols.
// The float versions are compiled for AVX-512, AVX2+FMA and baseline x86-64 (picked at load time, GCC/clang
// target_clones); the loops are written so that the compiler vectorises their innermost dimension.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace dpar::cpu::attention {

constexpr int kBlockQ = 32;  // query rows per work item
constexpr int kBlockK = 64;  // keys per tile

#if defined(__x86_64__) && defined(__GNUC__)
#define DPAR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DPAR_SIMD_CLONES
#endif
#define DPAR_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0 (scores minus a row maximum); exactly 0 for x < -87.3, including -inf.
// Cody-Waite range reduction to |r| <= ln2/2 and a degree-6 Taylor polynomial: relative error < 2e-7.
DPAR_INLINE float exp_nonpositive(float x) {
  const float clamped = x < -87.3f ? -87.3f : x;
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}
DPAR_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// s[i][0:kBlockK] = q[i] . kt[:, j] for every row i.
template <typename T>
DPAR_INLINE void scores(const T* __restrict q, int rows, int d, const T* __restrict kt, T* __restrict s) {
  for (int i = 0; i < rows; ++i) {
    T acc[kBlockK] = {};
    const T* qi = q + static_cast<int64_t>(i) * d;
    for (int c = 0; c < d; ++c) {
      const T a = qi[c];
      const T* kc = kt + static_cast<int64_t>(c) * kBlockK;
      for (int j = 0; j < kBlockK; ++j) acc[j] += a * kc[j];
    }
    std::memcpy(s + static_cast<int64_t>(i) * kBlockK, acc, sizeof(acc));
  }
}

// out[i][0:d] += sum_{j < visible[i]} p[i][j] * x[j][0:d]
template <typename T>
DPAR_INLINE void accumulate_rows(const T* __restrict p, int rows, const int* __restrict visible,
                                 const T* __restrict x, int d, T* __restrict out) {
  for (int i = 0; i < rows; ++i) {
    T* oi = out + static_cast<int64_t>(i) * d;
    const T* pi = p + static_cast<int64_t>(i) * kBlockK;
    for (int j = 0; j < visible[i]; ++j) {
      const T w = pi[j];
      const T* xj = x + static_cast<int64_t>(j) * d;
      for (int c = 0; c < d; ++c) oi[c] += w * xj[c];
    }
  }
}

// out[j][0:d] += sum_{i : j < visible[i]} p[i][j] * x[i][0:d]   (p transposed times x)
template <typename T>
DPAR_INLINE void accumulate_columns(const T* __restrict p, int rows, const int* __restrict visible,
                                    const T* __restrict x, int d, T* __restrict out) {
  for (int i = 0; i < rows; ++i) {
    const T* pi = p + static_cast<int64_t>(i) * kBlockK;
    const T* xi = x + static_cast<int64_t>(i) * d;
    for (int j = 0; j < visible[i]; ++j) {
      const T w = pi[j];
      T* oj = out + static_cast<int64_t>(j) * d;
      for (int c = 0; c < d; ++c) oj[c] += w * xi[c];
    }
  }
}

// Forward, one key block: online-softmax update of the running row maximum m, row sum l and unnormalised
// output o [rows][d]. s is scratch [rows][kBlockK].
template <typename T>
DPAR_INLINE void forward_block(const T* q, int rows, int d, const T* kt, const T* v, const int* visible, T* s,
                               T* m, T* l, T* o) {
  scores(q, rows, d, kt, s);
  for (int i = 0; i < rows; ++i) {
    const int n = visible[i];
    if (n == 0) continue;
    T* si = s + static_cast<int64_t>(i) * kBlockK;
    T row_max = m[i];
#pragma omp simd reduction(max : row_max)
    for (int j = 0; j < n; ++j) row_max = si[j] > row_max ? si[j] : row_max;
    for (int j = 0; j < n; ++j) si[j] = exp_nonpositive(si[j] - row_max);
    T row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int j = 0; j < n; ++j) row_sum += si[j];
    const T correction = exp_nonpositive(m[i] - row_max);  // 0 while m[i] is -inf
    m[i] = row_max;
    l[i] = l[i] * correction + row_sum;
    if (correction != T(1)) {
      T* oi = o + static_cast<int64_t>(i) * d;
      for (int c = 0; c < d; ++c) oi[c] *= correction;
    }
  }
  accumulate_rows(s, rows, visible, v, d, o);
}

// Backward, one (query block, key block) tile: recomputes P = exp(S - lse) and dS = P * (dP - delta), where
// dP = dout . v^T. On return p [rows][kBlockK] holds P and ds holds dS in the first visible[i] columns of row i
// (none for a row whose lse is -inf: it sees no key).
template <typename T>
DPAR_INLINE void backward_probabilities(const T* q, const T* dout, int rows, int d, const T* kt, const T* vt,
                                        const int* visible, const T* lse, const T* delta, T* p, T* ds) {
  scores(q, rows, d, kt, p);
  scores(dout, rows, d, vt, ds);
  for (int i = 0; i < rows; ++i) {
    T* pi = p + static_cast<int64_t>(i) * kBlockK;
    T* dsi = ds + static_cast<int64_t>(i) * kBlockK;
    const int n = visible[i];
    for (int j = 0; j < n; ++j) {
      pi[j] = exp_nonpositive(pi[j] - lse[i]);
      dsi[j] = pi[j] * (dsi[j] - delta[i]);
    }
  }
}

// Backward, dK/dV side of one tile: dv += P^T dout, dk += dS^T q (q pre-scaled, so dk needs no extra scale).
template <typename T>
DPAR_INLINE void backward_key_block(const T* q, const T* dout, int rows, int d, const T* kt, const T* vt,
                                    const int* visible, const T* lse, const T* delta, T* p, T* ds, T* dk,
                                    T* dv) {
  backward_probabilities(q, dout, rows, d, kt, vt, visible, lse, delta, p, ds);
  accumulate_columns(p, rows, visible, dout, d, dv);
  accumulate_columns(ds, rows, visible, q, d, dk);
}

// Backward, dQ side of one tile: dq += dS k (the caller multiplies by the softmax scale at the end).
template <typename T>
DPAR_INLINE void backward_query_block(const T* q, const T* dout, int rows, int d, const T* kt, const T* vt,
                                      const T* k, const int* visible, const T* lse, const T* delta, T* p, T* ds,
                                      T* dq) {
  backward_probabilities(q, dout, rows, d, kt, vt, visible, lse, delta, p, ds);
  accumulate_rows(ds, rows, visible, k, d, dq);
}

// Entry points: float versions compiled per instruction set, double versions plain.
DPAR_SIMD_CLONES static void forward_tile(const float* q, int rows, int d, const float* kt, const float* v,
                                          const int* visible, float* s, float* m, float* l, float* o) {
  forward_block(q, rows, d, kt, v, visible, s, m, l, o);
}
static void forward_tile(const double* q, int rows, int d, const double* kt, const double* v, const int* visible,
                         double* s, double* m, double* l, double* o) {
  forward_block(q, rows, d, kt, v, visible, s, m, l, o);
}

DPAR_SIMD_CLONES static void backward_key_tile(const float* q, const float* dout, int rows, int d, const float* kt,
                                               const float* vt, const int* visible, const float* lse,
                                               const float* delta, float* p, float* ds, float* dk, float* dv) {
  backward_key_block(q, dout, rows, d, kt, vt, visible, lse, delta, p, ds, dk, dv);
}
static void backward_key_tile(const double* q, const double* dout, int rows, int d, const double* kt,
                              const double* vt, const int* visible, const double* lse, const double* delta,
                              double* p, double* ds, double* dk, double* dv) {
  backward_key_block(q, dout, rows, d, kt, vt, visible, lse, delta, p, ds, dk, dv);
}

DPAR_SIMD_CLONES static void backward_query_tile(const float* q, const float* dout, int rows, int d,
                                                 const float* kt, const float* vt, const float* k,
                                                 const int* visible, const float* lse, const float* delta,
                                                 float* p, float* ds, float* dq) {
  backward_query_block(q, dout, rows, d, kt, vt, k, visible, lse, delta, p, ds, dq);
}
static void backward_query_tile(const double* q, const double* dout, int rows, int d, const double* kt,
                                const double* vt, const double* k, const int* visible, const double* lse,
                                const double* delta, double* p, double* ds, double* dq) {
  backward_query_block(q, dout, rows, d, kt, vt, k, visible, lse, delta, p, ds, dq);
}

}  // namespace dpar::cpu::attention
