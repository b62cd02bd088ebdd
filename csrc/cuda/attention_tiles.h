// Tile sizes, shared-memory plans and causal index math of the varlen attention kernels.
// Plain C++ (no CUDA headers needed) so that tests/test_cuda_attention_host.py can compile and check it on the host.
//
// Indices are local to one sequence: query j in [0, Lq), key i in [0, Lk). Bottom-right causal: query j sees the
// keys i <= Lk - Lq + j.
#pragma once

#if defined(__CUDACC__)
#define DPAR_HOST_DEVICE __host__ __device__
#else
#define DPAR_HOST_DEVICE
#endif

namespace dpar {
namespace attention {

constexpr int kThreads = 128;  // 4 warps per block in every attention kernel
constexpr int kWarps = kThreads / 32;
constexpr int kSmemAlign = 128;  // byte alignment of every shared-memory region (wmma needs 32)

DPAR_HOST_DEVICE constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
DPAR_HOST_DEVICE constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }
DPAR_HOST_DEVICE constexpr int min_int(int a, int b) { return a < b ? a : b; }
DPAR_HOST_DEVICE constexpr int max_int(int a, int b) { return a > b ? a : b; }

DPAR_HOST_DEVICE constexpr bool supported_head_dim(int d) {
  return d == 32 || d == 64 || d == 80 || d == 96 || d == 128;
}

// Exclusive end of the keys query j sees (0 when it sees none).
DPAR_HOST_DEVICE constexpr int visible_key_end(int j, int lq, int lk, bool causal) {
  return causal ? min_int(lk, max_int(0, lk - lq + j + 1)) : lk;
}

// True when query j (< lq) attends to key i (< lk).
DPAR_HOST_DEVICE constexpr bool key_visible(int j, int i, int lq, int lk, bool causal) {
  return j >= 0 && j < lq && i >= 0 && i < visible_key_end(j, lq, lk, causal);
}

// Exclusive end of the keys seen by any query of the block [q0, q0 + block_m) (visibility grows with j).
DPAR_HOST_DEVICE constexpr int block_key_end(int q0, int block_m, int lq, int lk, bool causal) {
  return visible_key_end(min_int(q0 + block_m, lq) - 1, lq, lk, causal);
}

// First query that sees key i (lq when none does); every later query sees it too.
DPAR_HOST_DEVICE constexpr int first_query_seeing(int i, int lq, int lk, bool causal) {
  return causal ? min_int(lq, max_int(0, i - lk + lq)) : (lk > i ? 0 : lq);
}

// Start of the first query block (of size block_m) that holds a query seeing key i.
DPAR_HOST_DEVICE constexpr int first_query_block_start(int i, int block_m, int lq, int lk, bool causal) {
  return first_query_seeing(i, lq, lk, causal) / block_m * block_m;
}

// Leading dimension (in elements) of a shared-memory tile of `cols` storage elements of kElemBytes each:
// 16-bit tiles feed wmma (ldm must be a multiple of 8), fp32 tiles are read by scalar loops (odd ldm avoids bank
// conflicts); float accumulator tiles always use ldm = cols + 4 (wmma stores need a multiple of 4).
DPAR_HOST_DEVICE constexpr int storage_ld(int cols, int elem_bytes) { return cols + (elem_bytes == 4 ? 1 : 8); }
DPAR_HOST_DEVICE constexpr int accum_ld(int cols) { return cols + 4; }
DPAR_HOST_DEVICE constexpr int region_bytes(int rows, int ld, int elem_bytes) {
  return round_up(rows * ld * elem_bytes, kSmemAlign);
}

// Launches whose longest query sequence has at most kShortQueries queries (patch cross-attention, decoding) run
// the kShort plans: 16 query rows per block instead of 32 or 64, so a one-query sequence leaves 15 of 16 rows idle
// instead of 31 of 32 or 63 of 64.
constexpr int kShortQueries = 16;

// Forward kernel: Q [M x d], K and V [N x d] and P [M x N] in storage type; S [M x N], O [M x d] and the row max and
// row sum [M] in fp32. Byte offsets of each region inside the dynamic shared memory.
template <int kElemBytes, int kHeadDim, bool kShort = false>
struct ForwardPlan {
  static constexpr int kBlockM = kShort ? kShortQueries : (kElemBytes == 4 ? 32 : 64);
  static constexpr int kBlockN = kShort ? 32 : kBlockM;  // the softmax gives each lane kBlockN / 32 columns
  static constexpr int kLdQkv = storage_ld(kHeadDim, kElemBytes);
  static constexpr int kLdS = accum_ld(kBlockN);
  static constexpr int kLdP = storage_ld(kBlockN, kElemBytes);
  static constexpr int kLdO = accum_ld(kHeadDim);
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + region_bytes(kBlockM, kLdQkv, kElemBytes);
  static constexpr int kV = kK + region_bytes(kBlockN, kLdQkv, kElemBytes);
  static constexpr int kS = kV + region_bytes(kBlockN, kLdQkv, kElemBytes);
  static constexpr int kP = kS + region_bytes(kBlockM, kLdS, 4);
  static constexpr int kO = kP + region_bytes(kBlockM, kLdP, kElemBytes);
  static constexpr int kRowMax = kO + region_bytes(kBlockM, kLdO, 4);
  static constexpr int kRowSum = kRowMax + region_bytes(kBlockM, 1, 4);
  static constexpr int kBytes = kRowSum + region_bytes(kBlockM, 1, 4);
};

// Backward kernels (dK/dV and dQ share it): Q, dO [M x d], K, V [N x d], P, dS [M x N] in storage type; S, dP
// [M x N], two accumulators [max(M, N) x d] (dK and dV, or dQ) and lse, delta [M] in fp32.
template <int kElemBytes, int kHeadDim, bool kShort = false>
struct BackwardPlan {
  static constexpr int kBlockM = kShort ? kShortQueries : 32;
  static constexpr int kBlockN = 32;
  static constexpr int kAccRows = kBlockM > kBlockN ? kBlockM : kBlockN;
  static constexpr int kLdQkv = storage_ld(kHeadDim, kElemBytes);
  static constexpr int kLdS = accum_ld(kBlockN);
  static constexpr int kLdP = storage_ld(kBlockN, kElemBytes);
  static constexpr int kLdAcc = accum_ld(kHeadDim);
  static constexpr int kQ = 0;
  static constexpr int kDout = kQ + region_bytes(kBlockM, kLdQkv, kElemBytes);
  static constexpr int kK = kDout + region_bytes(kBlockM, kLdQkv, kElemBytes);
  static constexpr int kV = kK + region_bytes(kBlockN, kLdQkv, kElemBytes);
  static constexpr int kS = kV + region_bytes(kBlockN, kLdQkv, kElemBytes);
  static constexpr int kDp = kS + region_bytes(kBlockM, kLdS, 4);
  static constexpr int kP = kDp + region_bytes(kBlockM, kLdS, 4);
  static constexpr int kDs = kP + region_bytes(kBlockM, kLdP, kElemBytes);
  static constexpr int kAcc0 = kDs + region_bytes(kBlockM, kLdP, kElemBytes);
  static constexpr int kAcc1 = kAcc0 + region_bytes(kAccRows, kLdAcc, 4);
  static constexpr int kLse = kAcc1 + region_bytes(kAccRows, kLdAcc, 4);
  static constexpr int kDelta = kLse + region_bytes(kBlockM, 1, 4);
  static constexpr int kBytes = kDelta + region_bytes(kBlockM, 1, 4);
};

}  // namespace attention
}  // namespace dpar
