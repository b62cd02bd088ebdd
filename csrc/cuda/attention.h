// Torch-free launchers of the varlen (packed, block-diagonal) attention kernels, FlashAttention-2 style.
//
// Layouts: q, out, dout, dq [total_q, heads_q, head_dim]; k, v, dk, dv [total_k, heads_kv, head_dim], each addressed
// through (token, head) strides in elements with a contiguous last dim. lse and delta are fp32 [heads_q, total_q],
// contiguous. cu_seqlens_q/k are int32 [batch + 1] device arrays (validated by the caller; clamped anyway). Query head h uses
// key/value head h / (heads_q / heads_kv). causal masks bottom-right aligned (query j of a sequence with Lq queries
// and Lk keys sees keys 0 .. Lk - Lq + j); a query that sees no key gets out 0 and lse -inf.
#pragma once
#include <cstdint>

#include "cuda/common.h"

namespace dpar {

struct VarlenAttentionShape {
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch;
  int heads_q;
  int heads_kv;
  int head_dim;  // 32, 64, 80, 96 or 128
  int max_seqlen_q;
  int max_seqlen_k;
  int64_t total_q;  // rows of out/dq; columns of lse and delta
  int64_t total_k;  // rows of k/v/dk/dv; the kernels clamp every sequence to [0, total_q) x [0, total_k)
  float softmax_scale;
  bool causal;
  DType dtype;  // storage type of q, k, v, out, dout, dq, dk, dv
};

struct TokenHeadStrides {
  int64_t token;
  int64_t head;
};

// Returns true when the launchers accept head_dim.
bool varlen_attention_supports_head_dim(int head_dim);

// out and lse are written for every query row.
cudaError_t varlen_attention_forward(const VarlenAttentionShape& shape, const void* q, TokenHeadStrides q_strides,
                                     const void* k, TokenHeadStrides k_strides, const void* v,
                                     TokenHeadStrides v_strides, void* out, TokenHeadStrides out_strides, float* lse,
                                     cudaStream_t stream);

// dq, dk, dv are written for every row (no zero-fill needed). delta_workspace: fp32 [heads_q, total_q] scratch.
cudaError_t varlen_attention_backward(const VarlenAttentionShape& shape, const void* dout,
                                      TokenHeadStrides dout_strides, const void* q, TokenHeadStrides q_strides,
                                      const void* k, TokenHeadStrides k_strides, const void* v,
                                      TokenHeadStrides v_strides, const void* out, TokenHeadStrides out_strides,
                                      const float* lse, void* dq, TokenHeadStrides dq_strides, void* dk,
                                      TokenHeadStrides dk_strides, void* dv, TokenHeadStrides dv_strides,
                                      float* delta_workspace, cudaStream_t stream);

}  // namespace dpar
