// Kernels of the varlen attention (see attention.h), FlashAttention-2 style: forward, delta preprocess, dK/dV and
// dQ. Included by attention.cu, which launches them on the GPU, and by tests/cuda_host/attention_emulation.cpp,
// which runs the same code on host fibers (DPAR_ATTENTION_HOST_EMULATION) to check it against the torch reference.
//
// Every kernel stages its tiles in dynamic shared memory (plans in attention_tiles.h) and runs its matmuls with
// block_gemm: wmma 16x16x16 tensor-core fragments for fp16/bf16 (sm_80+), scalar fp32 FMA loops for fp32. Softmax
// statistics, accumulators and all reductions are fp32; scores are kept in the log2 domain (exp2).
#pragma once
#include <mma.h>

#include <type_traits>

#include "cuda/attention.h"
#include "cuda/attention_tiles.h"
#include "cuda/common.cuh"

namespace dpar {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// bf16 wmma needs sm_80; older targets (if the build asks for them) take the scalar path for every dtype.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kArchHasTensorCoreBf16 = false;
#else
constexpr bool kArchHasTensorCoreBf16 = true;
#endif

template <typename T>
constexpr bool kUsesTensorCores = !std::is_same<T, float>::value && kArchHasTensorCoreBf16;

struct KernelArgs {
  VarlenAttentionShape shape;
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;
  const float* delta;
  void* result0;  // forward: out; backward: dq (dq kernel) or dk (dK/dV kernel)
  void* result1;  // dK/dV kernel: dv
  float* stats_out;  // forward: lse; delta kernel: delta
  TokenHeadStrides q_strides, k_strides, v_strides, out_strides, dout_strides, result0_strides, result1_strides;
};

// Bounds of one sequence of the packed batch.
struct Sequence {
  int q_start, q_len, k_start, k_len;
};

// Segment b of offsets cu, clamped to 0 <= start <= end <= total: offsets that lie (validation skipped) give wrong
// numbers, never an out-of-bounds access.
__device__ __forceinline__ void clamped_segment(const int32_t* cu, int b, int64_t total, int& start, int& len) {
  int64_t first = cu[b], last = cu[b + 1];
  first = first < 0 ? 0 : (first > total ? total : first);
  last = last < first ? first : (last > total ? total : last);
  start = static_cast<int>(first);
  len = static_cast<int>(last - first);
}

__device__ __forceinline__ Sequence load_sequence(const VarlenAttentionShape& shape, int b) {
  Sequence s;
  clamped_segment(shape.cu_seqlens_q, b, shape.total_q, s.q_start, s.q_len);
  clamped_segment(shape.cu_seqlens_k, b, shape.total_k, s.k_start, s.k_len);
  return s;
}

#if defined(DPAR_ATTENTION_HOST_EMULATION)
unsigned char* shared_bytes();  // the host emulation's per-block buffer (tests/cuda_host)
#else
__device__ __forceinline__ unsigned char* shared_bytes() {
  extern __shared__ __align__(128) unsigned char dpar_attention_smem[];
  return dpar_attention_smem;
}
#endif

template <typename P>
__device__ __forceinline__ P* region(int offset) {
  return reinterpret_cast<P*>(shared_bytes() + offset);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int mask = 16; mask > 0; mask >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int mask = 16; mask > 0; mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

// Copies rows [row0, row0 + valid) of one head of a [tokens, heads, kD] tensor into a kRows x kD tile (leading
// dimension ld); rows past `valid` are zero-filled so that padded rows never carry garbage into the matmuls.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* base, TokenHeadStrides strides, int64_t row0,
                                          int head, int valid) {
  const T* src = base + row0 * strides.token + head * strides.head;
  for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD, c = idx % kD;
    tile[r * ld + c] = r < valid ? src[r * strides.token + c] : from_float<T>(0.f);
  }
}

template <int kRows, int kD>
__device__ __forceinline__ void zero_accumulator(float* acc, int ld) {
  for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) acc[(idx / kD) * ld + idx % kD] = 0.f;
}

// Writes the first `valid` rows of a float kRows x kD accumulator, times `scale`, to one head of a
// [tokens, heads, kD] tensor.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void store_tile(T* base, TokenHeadStrides strides, int64_t row0, int head, int valid,
                                           const float* acc, int ld) {
  T* dst = base + row0 * strides.token + head * strides.head;
  for (int idx = threadIdx.x; idx < kRows * kD; idx += kThreads) {
    const int r = idx / kD, c = idx % kD;
    if (r < valid) dst[r * strides.token + c] = from_float<T>(acc[r * ld + c]);
  }
}

// C[M x N] (fp32, row-major, ldc) = (kAccumulate ? C : 0) + A[M x K] * B[K x N], all in shared memory.
// A(i, k) = a[i * lda + k] (kATransposed: a[k * lda + i]); B(k, j) = b[k * ldb + j] (kBTransposed: b[j * ldb + k]).
// Whole block calls it; no synchronisation inside (callers sync before reading C).
template <typename T, int M, int N, int K, bool kATransposed, bool kBTransposed, bool kAccumulate>
__device__ __forceinline__ void block_gemm(const T* a, int lda, const T* b, int ldb, float* c, int ldc) {
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "tiles are multiples of 16");
  if constexpr (kUsesTensorCores<T>) {
    namespace wmma = nvcuda::wmma;
    using LayoutA = std::conditional_t<kATransposed, wmma::col_major, wmma::row_major>;
    using LayoutB = std::conditional_t<kBTransposed, wmma::col_major, wmma::row_major>;
    constexpr int kTilesN = N / 16;
    const int warp = threadIdx.x / 32;
    for (int tile = warp; tile < (M / 16) * kTilesN; tile += kWarps) {
      const int ti = tile / kTilesN, tj = tile % kTilesN;
      float* c_tile = c + ti * 16 * ldc + tj * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if constexpr (kAccumulate) {
        wmma::load_matrix_sync(acc, c_tile, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.f);
      }
#pragma unroll 2
      for (int kk = 0; kk < K / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
        wmma::load_matrix_sync(fa, kATransposed ? a + kk * 16 * lda + ti * 16 : a + ti * 16 * lda + kk * 16, lda);
        wmma::load_matrix_sync(fb, kBTransposed ? b + tj * 16 * ldb + kk * 16 : b + kk * 16 * ldb + tj * 16, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c_tile, acc, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int i = idx / N, j = idx % N;
      float sum = kAccumulate ? c[i * ldc + j] : 0.f;
#pragma unroll 8
      for (int kk = 0; kk < K; ++kk) {
        const float x = to_float(kATransposed ? a[kk * lda + i] : a[i * lda + kk]);
        const float y = to_float(kBTransposed ? b[j * ldb + kk] : b[kk * ldb + j]);
        sum = fmaf(x, y, sum);
      }
      c[i * ldc + j] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: one block per (sequence, query block, query head).
template <typename T, int kD, bool kShort>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(KernelArgs args) {
  using Plan = ForwardPlan<sizeof(T), kD, kShort>;
  constexpr int kM = Plan::kBlockM, kN = Plan::kBlockN;
  static_assert(kN % 32 == 0, "the softmax gives each lane kN / 32 columns");
  const VarlenAttentionShape& shape = args.shape;
  const Sequence seq = load_sequence(shape, blockIdx.x);
  const int q0 = blockIdx.y * kM;
  if (q0 >= seq.q_len) return;
  const int head = blockIdx.z;
  const int kv_head = head / (shape.heads_q / shape.heads_kv);
  const int rows = min_int(kM, seq.q_len - q0);
  const float scale_log2 = shape.softmax_scale * kLog2e;

  T* q_tile = region<T>(Plan::kQ);
  T* k_tile = region<T>(Plan::kK);
  T* v_tile = region<T>(Plan::kV);
  float* scores = region<float>(Plan::kS);
  T* probs = region<T>(Plan::kP);
  float* acc = region<float>(Plan::kO);
  float* row_max = region<float>(Plan::kRowMax);
  float* row_sum = region<float>(Plan::kRowSum);

  load_tile<T, kM, kD>(q_tile, Plan::kLdQkv, static_cast<const T*>(args.q), args.q_strides, seq.q_start + q0, head,
                       rows);
  zero_accumulator<kM, kD>(acc, Plan::kLdO);
  for (int r = threadIdx.x; r < kM; r += kThreads) {
    row_max[r] = kNegInf;
    row_sum[r] = 0.f;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_end = block_key_end(q0, kM, seq.q_len, seq.k_len, shape.causal);
  for (int k0 = 0; k0 < key_end; k0 += kN) {
    const int cols = min_int(kN, seq.k_len - k0);
    __syncthreads();  // previous iteration's P @ V is done with k_tile, v_tile, probs
    load_tile<T, kN, kD>(k_tile, Plan::kLdQkv, static_cast<const T*>(args.k), args.k_strides, seq.k_start + k0,
                         kv_head, cols);
    load_tile<T, kN, kD>(v_tile, Plan::kLdQkv, static_cast<const T*>(args.v), args.v_strides, seq.k_start + k0,
                         kv_head, cols);
    __syncthreads();
    block_gemm<T, kM, kN, kD, false, true, false>(q_tile, Plan::kLdQkv, k_tile, Plan::kLdQkv, scores, Plan::kLdS);
    __syncthreads();
    // Online softmax: each warp owns rows warp, warp + kWarps, ...; lanes stride over the columns.
    for (int r = warp; r < kM; r += kWarps) {
      float s[kN / 32];
      float tile_max = kNegInf;
#pragma unroll
      for (int t = 0; t < kN / 32; ++t) {
        const int c = lane + 32 * t;
        const bool visible = key_visible(q0 + r, k0 + c, seq.q_len, seq.k_len, shape.causal);
        s[t] = visible ? scores[r * Plan::kLdS + c] * scale_log2 : kNegInf;
        tile_max = fmaxf(tile_max, s[t]);
      }
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, warp_max(tile_max));
      // A row that has seen no key yet keeps max -inf: its probabilities are 0 and nothing needs rescaling.
      const bool empty = new_max == kNegInf;
      const float alpha = empty ? 1.f : exp2f(old_max - new_max);
      float tile_sum = 0.f;
#pragma unroll
      for (int t = 0; t < kN / 32; ++t) {
        const float p = empty ? 0.f : exp2f(s[t] - new_max);
        tile_sum += p;
        probs[r * Plan::kLdP + lane + 32 * t] = from_float<T>(p);
      }
      tile_sum = warp_sum(tile_sum);
      for (int c = lane; c < kD; c += 32) acc[r * Plan::kLdO + c] *= alpha;
      __syncwarp();
      if (lane == 0) {
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * alpha + tile_sum;
      }
    }
    __syncthreads();
    block_gemm<T, kM, kD, kN, false, false, true>(probs, Plan::kLdP, v_tile, Plan::kLdQkv, acc, Plan::kLdO);
  }
  __syncthreads();

  T* out = static_cast<T*>(args.result0);
  for (int r = warp; r < rows; r += kWarps) {
    const float sum = row_sum[r];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* dst = out + (seq.q_start + q0 + r) * args.result0_strides.token + head * args.result0_strides.head;
    for (int c = lane; c < kD; c += 32) dst[c] = from_float<T>(acc[r * Plan::kLdO + c] * inv);
    if (lane == 0) {
      args.stats_out[head * shape.total_q + seq.q_start + q0 + r] =
          sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : kNegInf;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward preprocess: delta[h, t] = sum_d dout[t, h, d] * out[t, h, d]; one warp per (token, head).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) delta_kernel(KernelArgs args) {
  const VarlenAttentionShape& shape = args.shape;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= shape.total_q * shape.heads_q) return;
  const int lane = threadIdx.x % 32;
  const int64_t token = row / shape.heads_q;
  const int head = static_cast<int>(row % shape.heads_q);
  const T* dout = static_cast<const T*>(args.dout) + token * args.dout_strides.token + head * args.dout_strides.head;
  const T* out = static_cast<const T*>(args.out) + token * args.out_strides.token + head * args.out_strides.head;
  float sum = 0.f;
  for (int c = lane; c < shape.head_dim; c += 32) sum = fmaf(to_float(dout[c]), to_float(out[c]), sum);
  sum = warp_sum(sum);
  if (lane == 0) args.stats_out[head * shape.total_q + token] = sum;
}

// Shared step of both backward kernels, on staged Q, dO, K, V tiles and their rows' lse and delta:
// S = Q K^T, dP = dO V^T, then P = exp(S * scale - lse) (0 where masked) and dS = P * (dP - delta) * scale,
// stored in the storage type for the following matmuls.
template <typename T, int kD, bool kShort>
__device__ __forceinline__ void probabilities_and_score_grads(const VarlenAttentionShape& shape, const Sequence& seq,
                                                              int q0, int k0) {
  using Plan = BackwardPlan<sizeof(T), kD, kShort>;
  constexpr int kM = Plan::kBlockM, kN = Plan::kBlockN;
  const T* q_tile = region<T>(Plan::kQ);
  const T* dout_tile = region<T>(Plan::kDout);
  const T* k_tile = region<T>(Plan::kK);
  const T* v_tile = region<T>(Plan::kV);
  float* scores = region<float>(Plan::kS);
  float* dprobs = region<float>(Plan::kDp);
  block_gemm<T, kM, kN, kD, false, true, false>(q_tile, Plan::kLdQkv, k_tile, Plan::kLdQkv, scores, Plan::kLdS);
  block_gemm<T, kM, kN, kD, false, true, false>(dout_tile, Plan::kLdQkv, v_tile, Plan::kLdQkv, dprobs, Plan::kLdS);
  __syncthreads();
  const float* lse_log2 = region<float>(Plan::kLse);
  const float* delta = region<float>(Plan::kDelta);
  T* probs = region<T>(Plan::kP);
  T* dscores = region<T>(Plan::kDs);
  const float scale_log2 = shape.softmax_scale * kLog2e;
  for (int idx = threadIdx.x; idx < kM * kN; idx += kThreads) {
    const int r = idx / kN, c = idx % kN;
    const bool visible = key_visible(q0 + r, k0 + c, seq.q_len, seq.k_len, shape.causal) && lse_log2[r] != kNegInf;
    const float p = visible ? exp2f(scores[r * Plan::kLdS + c] * scale_log2 - lse_log2[r]) : 0.f;
    const float ds = p * (dprobs[r * Plan::kLdS + c] - delta[r]) * shape.softmax_scale;
    probs[r * Plan::kLdP + c] = from_float<T>(p);
    dscores[r * Plan::kLdP + c] = from_float<T>(ds);
  }
  __syncthreads();
}

// Stages the Q and dO rows [q0, q0 + rows) of `head` with their lse (in log2 units) and delta.
template <typename T, int kD, bool kShort>
__device__ __forceinline__ void load_query_side(const KernelArgs& args, const Sequence& seq, int q0, int head) {
  using Plan = BackwardPlan<sizeof(T), kD, kShort>;
  constexpr int kM = Plan::kBlockM;
  const int rows = min_int(kM, seq.q_len - q0);
  load_tile<T, kM, kD>(region<T>(Plan::kQ), Plan::kLdQkv, static_cast<const T*>(args.q), args.q_strides,
                       seq.q_start + q0, head, rows);
  load_tile<T, kM, kD>(region<T>(Plan::kDout), Plan::kLdQkv, static_cast<const T*>(args.dout), args.dout_strides,
                       seq.q_start + q0, head, rows);
  float* lse_log2 = region<float>(Plan::kLse);
  float* delta = region<float>(Plan::kDelta);
  const int64_t base = head * args.shape.total_q + seq.q_start + q0;
  for (int r = threadIdx.x; r < kM; r += kThreads) {
    lse_log2[r] = r < rows ? args.lse[base + r] * kLog2e : kNegInf;
    delta[r] = r < rows ? args.delta[base + r] : 0.f;
  }
}

// dK/dV: one block per (sequence, key block, kv head); loops over the group's query heads and the query blocks that
// see the key block, accumulating in shared memory (no atomics).
template <typename T, int kD, bool kShort>
__global__ void __launch_bounds__(kThreads, 1) dkdv_kernel(KernelArgs args) {
  using Plan = BackwardPlan<sizeof(T), kD, kShort>;
  constexpr int kM = Plan::kBlockM, kN = Plan::kBlockN;
  const VarlenAttentionShape& shape = args.shape;
  const Sequence seq = load_sequence(shape, blockIdx.x);
  const int k0 = blockIdx.y * kN;
  if (k0 >= seq.k_len) return;
  const int kv_head = blockIdx.z;
  const int group = shape.heads_q / shape.heads_kv;
  const int cols = min_int(kN, seq.k_len - k0);

  load_tile<T, kN, kD>(region<T>(Plan::kK), Plan::kLdQkv, static_cast<const T*>(args.k), args.k_strides,
                       seq.k_start + k0, kv_head, cols);
  load_tile<T, kN, kD>(region<T>(Plan::kV), Plan::kLdQkv, static_cast<const T*>(args.v), args.v_strides,
                       seq.k_start + k0, kv_head, cols);
  float* dk_acc = region<float>(Plan::kAcc0);
  float* dv_acc = region<float>(Plan::kAcc1);
  zero_accumulator<kN, kD>(dk_acc, Plan::kLdAcc);
  zero_accumulator<kN, kD>(dv_acc, Plan::kLdAcc);

  const int first_q0 = first_query_block_start(k0, kM, seq.q_len, seq.k_len, shape.causal);
  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    for (int q0 = first_q0; q0 < seq.q_len; q0 += kM) {
      __syncthreads();  // previous step's matmuls are done with the query-side tiles
      load_query_side<T, kD, kShort>(args, seq, q0, head);
      __syncthreads();
      probabilities_and_score_grads<T, kD, kShort>(shape, seq, q0, k0);
      // dV += P^T dO, dK += dS^T Q
      block_gemm<T, kN, kD, kM, true, false, true>(region<T>(Plan::kP), Plan::kLdP, region<T>(Plan::kDout),
                                                   Plan::kLdQkv, dv_acc, Plan::kLdAcc);
      block_gemm<T, kN, kD, kM, true, false, true>(region<T>(Plan::kDs), Plan::kLdP, region<T>(Plan::kQ),
                                                   Plan::kLdQkv, dk_acc, Plan::kLdAcc);
    }
  }
  __syncthreads();
  store_tile<T, kN, kD>(static_cast<T*>(args.result0), args.result0_strides, seq.k_start + k0, kv_head, cols, dk_acc,
                        Plan::kLdAcc);
  store_tile<T, kN, kD>(static_cast<T*>(args.result1), args.result1_strides, seq.k_start + k0, kv_head, cols, dv_acc,
                        Plan::kLdAcc);
}

// dQ: one block per (sequence, query block, query head); loops over the key blocks the query block sees.
template <typename T, int kD, bool kShort>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(KernelArgs args) {
  using Plan = BackwardPlan<sizeof(T), kD, kShort>;
  constexpr int kM = Plan::kBlockM, kN = Plan::kBlockN;
  const VarlenAttentionShape& shape = args.shape;
  const Sequence seq = load_sequence(shape, blockIdx.x);
  const int q0 = blockIdx.y * kM;
  if (q0 >= seq.q_len) return;
  const int head = blockIdx.z;
  const int kv_head = head / (shape.heads_q / shape.heads_kv);
  const int rows = min_int(kM, seq.q_len - q0);

  load_query_side<T, kD, kShort>(args, seq, q0, head);
  float* dq_acc = region<float>(Plan::kAcc0);
  zero_accumulator<kM, kD>(dq_acc, Plan::kLdAcc);

  const int key_end = block_key_end(q0, kM, seq.q_len, seq.k_len, shape.causal);
  for (int k0 = 0; k0 < key_end; k0 += kN) {
    const int cols = min_int(kN, seq.k_len - k0);
    __syncthreads();  // previous step's dQ matmul is done with k_tile and dS
    load_tile<T, kN, kD>(region<T>(Plan::kK), Plan::kLdQkv, static_cast<const T*>(args.k), args.k_strides,
                         seq.k_start + k0, kv_head, cols);
    load_tile<T, kN, kD>(region<T>(Plan::kV), Plan::kLdQkv, static_cast<const T*>(args.v), args.v_strides,
                         seq.k_start + k0, kv_head, cols);
    __syncthreads();
    probabilities_and_score_grads<T, kD, kShort>(shape, seq, q0, k0);
    // dQ += dS K
    block_gemm<T, kM, kD, kN, false, false, true>(region<T>(Plan::kDs), Plan::kLdP, region<T>(Plan::kK),
                                                  Plan::kLdQkv, dq_acc, Plan::kLdAcc);
  }
  __syncthreads();
  store_tile<T, kM, kD>(static_cast<T*>(args.result0), args.result0_strides, seq.q_start + q0, head, rows, dq_acc,
                        Plan::kLdAcc);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: grids, shared-memory sizes and kernel arguments. `launch(kernel, grid, smem_bytes, stream, args)` runs
// one kernel (a CUDA launch in attention.cu, host threads in the emulation).

// Calls body(std::integral_constant<int, D>{}) for the head dim of `shape` (supported, see valid_shape).
template <typename Body>
cudaError_t dispatch_head_dim(const VarlenAttentionShape& shape, Body&& body) {
  switch (shape.head_dim) {
    case 32: return body(std::integral_constant<int, 32>{});
    case 64: return body(std::integral_constant<int, 64>{});
    case 80: return body(std::integral_constant<int, 80>{});
    case 96: return body(std::integral_constant<int, 96>{});
    case 128: return body(std::integral_constant<int, 128>{});
  }
  return cudaErrorInvalidValue;
}

// Calls body(T{}, std::bool_constant<kShort>{}) for the storage type of `shape`, kShort when its longest query
// sequence fits the short plans (kShortQueries).
template <typename Body>
cudaError_t dispatch_dtype_and_plan(const VarlenAttentionShape& shape, Body&& body) {
  return dispatch_dtype(shape.dtype, [&](auto type_tag) -> cudaError_t {
    return shape.max_seqlen_q <= kShortQueries ? body(type_tag, std::true_type{}) : body(type_tag, std::false_type{});
  });
}

inline bool valid_shape(const VarlenAttentionShape& shape) {
  return shape.batch >= 0 && shape.heads_kv > 0 && shape.heads_q > 0 && shape.heads_q % shape.heads_kv == 0 &&
         shape.max_seqlen_q >= 0 && shape.max_seqlen_k >= 0 && shape.total_q >= 0 &&
         supported_head_dim(shape.head_dim);
}

// The arguments of the backward launchers beyond KernelArgs (shape, q, k, v, out, dout with strides and lse):
// delta_workspace fp32 [heads_q, total_q]; the results go to dq, dk, dv.
struct BackwardOutputs {
  float* delta_workspace;
  void* dq;
  TokenHeadStrides dq_strides;
  void* dk;
  TokenHeadStrides dk_strides;
  void* dv;
  TokenHeadStrides dv_strides;
};

// The forward of head dim kD (the shape's, valid). args: shape, q, k, v with strides, result0 = out (+ strides),
// stats_out = lse.
template <int kD, typename Launch>
cudaError_t run_forward_head_dim(const KernelArgs& args, cudaStream_t stream, Launch&& launch) {
  const VarlenAttentionShape& shape = args.shape;
  return dispatch_dtype_and_plan(shape, [&](auto type_tag, auto short_tag) -> cudaError_t {
    using T = decltype(type_tag);
    constexpr bool kShort = decltype(short_tag)::value;
    using Plan = ForwardPlan<sizeof(T), kD, kShort>;
    const dim3 grid(shape.batch, ceil_div(shape.max_seqlen_q, Plan::kBlockM), shape.heads_q);
    return launch(forward_kernel<T, kD, kShort>, grid, Plan::kBytes, stream, args);
  });
}

// The backward of head dim kD (the shape's, valid).
template <int kD, typename Launch>
cudaError_t run_backward_head_dim(KernelArgs args, const BackwardOutputs& outputs, cudaStream_t stream,
                                  Launch&& launch) {
  const VarlenAttentionShape& shape = args.shape;
  return dispatch_dtype_and_plan(shape, [&](auto type_tag, auto short_tag) -> cudaError_t {
    using T = decltype(type_tag);
    constexpr bool kShort = decltype(short_tag)::value;
    using Plan = BackwardPlan<sizeof(T), kD, kShort>;

    args.delta = outputs.delta_workspace;
    KernelArgs delta_args = args;
    delta_args.stats_out = outputs.delta_workspace;
    const int64_t delta_blocks = (shape.total_q * shape.heads_q + kWarps - 1) / kWarps;
    if (delta_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    cudaError_t err = launch(delta_kernel<T>, dim3(static_cast<unsigned>(delta_blocks)), 0, stream, delta_args);
    if (err != cudaSuccess) return err;

    KernelArgs dq_args = args;
    dq_args.result0 = outputs.dq;
    dq_args.result0_strides = outputs.dq_strides;
    err = launch(dq_kernel<T, kD, kShort>, dim3(shape.batch, ceil_div(shape.max_seqlen_q, Plan::kBlockM), shape.heads_q),
                 Plan::kBytes, stream, dq_args);
    if (err != cudaSuccess) return err;

    KernelArgs dkdv_args = args;
    dkdv_args.result0 = outputs.dk;
    dkdv_args.result0_strides = outputs.dk_strides;
    dkdv_args.result1 = outputs.dv;
    dkdv_args.result1_strides = outputs.dv_strides;
    return launch(dkdv_kernel<T, kD, kShort>, dim3(shape.batch, ceil_div(shape.max_seqlen_k, Plan::kBlockN), shape.heads_kv),
                  Plan::kBytes, stream, dkdv_args);
  });
}

// Every head dim in one unit (the host emulation); the GPU build instantiates one unit per head dim and direction
// (attention_units.cuh).
template <typename Launch>
cudaError_t run_forward(const KernelArgs& args, cudaStream_t stream, Launch&& launch) {
  if (!valid_shape(args.shape)) return cudaErrorInvalidValue;
  return dispatch_head_dim(args.shape, [&](auto dim_tag) {
    return run_forward_head_dim<decltype(dim_tag)::value>(args, stream, launch);
  });
}

template <typename Launch>
cudaError_t run_backward(const KernelArgs& args, const BackwardOutputs& outputs, cudaStream_t stream,
                         Launch&& launch) {
  if (!valid_shape(args.shape)) return cudaErrorInvalidValue;
  return dispatch_head_dim(args.shape, [&](auto dim_tag) {
    return run_backward_head_dim<decltype(dim_tag)::value>(args, outputs, stream, launch);
  });
}

}  // namespace attention
}  // namespace dpar
