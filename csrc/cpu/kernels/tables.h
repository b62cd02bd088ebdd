// The kernel tables: one constant object per instruction-set path and op family (see cpu/isa.h), defined by the
// path files csrc/cpu/isa/<path>_<op>.cpp from the torch-free bodies csrc/cpu/kernels/<op>.inc. The torch-side code
// (csrc/cpu/<op>.cpp) validates, lays out buffers and threads the work, then calls the active path's table.
// Tensors enter as raw pointers; float16 and bfloat16 values as their uint16_t bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace dpar::cpu {

// ------------------------------------------------------------------------------------------------- attention
// Flash-attention tiles (layouts in cpu/kernels/attention.inc), in the compute type T (float; double for float64).
constexpr int kBlockQ = 32;     // query rows per work item
constexpr int kBlockK = 64;     // keys per tile
constexpr int kRowDotRows = 4;  // tiles of at most this many query rows take their scores from key rows

template <typename T>
struct AttentionTiles {
  void (*forward)(const T* q, int64_t rows, int64_t d, int64_t dp, const T* kt, const T* v, int64_t cols,
                  const int* visible, T* s, T* m, T* l, T* o);
  void (*backward_key)(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt, const T* vt,
                       int64_t cols, const int* visible, const T* lse, const T* delta, T* p, T* ds, T* dk, T* dv);
  void (*backward_query)(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt, const T* vt,
                         const T* k, int64_t cols, const int* visible, const T* lse, const T* delta, T* p, T* ds,
                         T* dq);
  void (*backward_fused)(const T* q, const T* dout, int64_t rows, int64_t d, int64_t dp, const T* kt, const T* vt,
                         const T* k, int64_t cols, const int* visible, const T* lse, const T* delta, T* p, T* ds,
                         T* dq, T* dk, T* dv);
  void (*forward_rows)(const T* q, int64_t rows, int64_t dp, const T* k, const T* v, int64_t cols,
                       const int* visible, T* s, T* m, T* l, T* o);
  void (*backward_fused_rows)(const T* q, const T* dout, int64_t rows, int64_t dp, const T* k, const T* v,
                              int64_t cols, const int* visible, const T* lse, const T* delta, T* p, T* ds, T* dq,
                              T* dk, T* dv);
};

struct AttentionKernels {
  AttentionTiles<float> f32;
  AttentionTiles<double> f64;
};

// -------------------------------------------------------------------------------------------------- kvcache
// One decode unit (cpu/kernels/kvcache.inc): q [rows][dp] pre-scaled, k / v `keys` rows of dp values at k_stride /
// v_stride, ends[r] keys seen by row r; scratch s [rows][ld_s], tail [kMaxVectorBytes / sizeof(T)][dp], norm
// [rows]; acc [rows][dp] <- the normalised outputs.
template <typename T>
using DecodeUnit = void (*)(const T* q, int64_t rows, int64_t dp, const T* k, int64_t k_stride, const T* v,
                            int64_t v_stride, int64_t keys, const int64_t* ends, T* s, int64_t ld_s, T* tail,
                            T* norm, T* acc);

struct KvcacheKernels {
  DecodeUnit<float> f32;
  DecodeUnit<double> f64;
};

// --------------------------------------------------------------------------------------------------- linear
// Output columns [first, last) of out [rows, outputs] = x [rows, depth] . w [outputs, depth]^T (+ bias); first a
// multiple of kLinearColumnBlock, depth a multiple of kMaxVectorBytes / 4 (cpu/kernels/linear.inc).
constexpr int kLinearColumnBlock = 4;

struct LinearKernels {
  void (*columns)(const float* x, int64_t x_stride, int64_t rows, const float* w, int64_t w_stride, int64_t outputs,
                  int64_t depth, const float* bias, float* out, int64_t first, int64_t last);
};

// -------------------------------------------------------------------------------------------------- entropy
// Online entropy state of a set of scaled logits: m = max raw logit, s = sum e, w = sum t e with t = (z - m) * inv_t
// and e = exp(t). An empty state has m = -inf, s = w = 0.
template <typename Acc>
struct EntropyState {
  Acc m, s, w;
};

// Merges state b into a; both may be empty. Shifting s by d = (m_old - m_new) * inv_t multiplies it by exp(d) and
// adds d to every t of w.
template <typename Acc>
inline EntropyState<Acc> merge(EntropyState<Acc> a, EntropyState<Acc> b, Acc inv_t) {
  const Acc m = std::max(a.m, b.m);
  if (m == -std::numeric_limits<Acc>::infinity()) return a;
  auto shifted = [&](EntropyState<Acc> x) -> EntropyState<Acc> {
    if (x.s == Acc(0)) return {m, Acc(0), Acc(0)};
    const Acc d = (x.m - m) * inv_t;
    const Acc scale = std::exp(d);
    return {m, scale * x.s, scale * (x.w + d * x.s)};
  };
  const EntropyState<Acc> sa = shifted(a), sb = shifted(b);
  return {m, sa.s + sb.s, sa.w + sb.w};
}

// The state of one row of V logits (unit stride), cpu/kernels/entropy.inc.
struct EntropyKernels {
  EntropyState<float> (*f32)(const float* row, int64_t V, float inv_t);
  EntropyState<float> (*f16)(const uint16_t* row, int64_t V, float inv_t);
  EntropyState<float> (*bf16)(const uint16_t* row, int64_t V, float inv_t);
  EntropyState<double> (*f64)(const double* row, int64_t V, double inv_t);
};

// ------------------------------------------------------------------------------------------- gather_scatter
enum class PatchReduce : int { kMax, kSum, kMean };

// One patch = token rows [start, stop) of x (cpu/kernels/gather_scatter.inc), in storage type T, accumulated in Acc.
template <typename T, typename Acc>
struct PatchRows {
  // out[0:cols] = the reduction of the patch's rows (0 for an empty patch); with argmax (max only, else null) also
  // the first token of each column's maximum (-1 for an empty patch or a NaN column). acc, arg: [cols] scratch.
  void (*gather)(const T* x, int64_t x_stride, int64_t start, int64_t stop, int64_t cols, PatchReduce reduce,
                 T* out, int32_t* argmax, Acc* acc, int32_t* arg);
  // grad_x rows [start, stop) (row stride cols) from the patch's gradient g[0:cols]: max: g where argmax names the
  // token, else 0; sum: g; mean: g / length. scaled: [cols] scratch. Returns whether an argmax entry (>= 0) lies
  // outside [start, stop) (such a column gets no gradient).
  bool (*spread)(const T* g, const int32_t* argmax, int64_t start, int64_t stop, int64_t cols, PatchReduce reduce,
                 T* grad_x, T* scaled);
};

struct GatherScatterKernels {
  PatchRows<float, float> f32;
  PatchRows<double, double> f64;
  PatchRows<uint16_t, float> f16;
  PatchRows<uint16_t, float> bf16;
};

// ------------------------------------------------------------------------------------------ the active path
const AttentionKernels& attention_kernels();
const KvcacheKernels& kvcache_kernels();
const LinearKernels& linear_kernels();
const EntropyKernels& entropy_kernels();
const GatherScatterKernels& gather_scatter_kernels();

// Each path's tables (defined in csrc/cpu/isa/<path>_<op>.cpp).
#define DPAR_DECLARE_PATH_TABLES                               \
  extern const AttentionKernels attention_kernels_table;       \
  extern const KvcacheKernels kvcache_kernels_table;           \
  extern const LinearKernels linear_kernels_table;             \
  extern const EntropyKernels entropy_kernels_table;           \
  extern const GatherScatterKernels gather_scatter_kernels_table;
namespace isa_default { DPAR_DECLARE_PATH_TABLES }
namespace isa_avx2 { DPAR_DECLARE_PATH_TABLES }
namespace isa_avx512 { DPAR_DECLARE_PATH_TABLES }
#undef DPAR_DECLARE_PATH_TABLES

}  // namespace dpar::cpu
