// CUDA kernels of dpar_C::varlen_attention and dpar_C::varlen_attention_backward (schemas in csrc/cpu/attention.cpp).
#include <ATen/ATen.h>

#include "cuda/attention.h"

#include "cuda_bindings/common.h"

namespace dpar {
namespace {

void check_token_head_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "varlen_attention: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == q.device(), "varlen_attention: ", name, " must be on ", q.device(), ", got ",
              t.device());
  TORCH_CHECK(t.dim() == 3, "varlen_attention: ", name, " must be [tokens, heads, head_dim], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "varlen_attention: ", name, " must have dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(2) == q.size(2), "varlen_attention: ", name, " must have head dim ", q.size(2), ", got ",
              t.size(2));
  TORCH_CHECK(t.stride(2) == 1, "varlen_attention: ", name, " must have a contiguous last dim");
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q, int64_t batch) {
  TORCH_CHECK(cu.is_cuda() && cu.device() == q.device(), "varlen_attention: ", name, " must be on ", q.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous(), "varlen_attention: ", name,
              " must be a contiguous 1-D int32 tensor");
  TORCH_CHECK(cu.numel() == batch + 1, "varlen_attention: ", name, " must have ", batch + 1, " entries, got ",
              cu.numel());
}

TokenHeadStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1)}; }

// Validates q, k, v and the offsets and returns the shape shared by the forward and backward launchers.
VarlenAttentionShape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, double softmax_scale, bool causal) {
  check_token_head_tensor(q, "q", q);
  check_token_head_tensor(k, "k", q);
  check_token_head_tensor(v, "v", q);
  TORCH_CHECK(k.sizes() == v.sizes(), "varlen_attention: k and v must have the same shape");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "varlen_attention: the number of query heads must be a multiple of the number of kv heads");
  TORCH_CHECK(varlen_attention_supports_head_dim(static_cast<int>(q.size(2))),
              "varlen_attention (cuda): head dim must be 32, 64, 80, 96 or 128, got ", q.size(2));
  const int64_t batch = cu_seqlens_q.numel() - 1;
  TORCH_CHECK(batch >= 0, "varlen_attention: cu_seqlens_q must not be empty");
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, batch);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, batch);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= INT32_MAX && max_seqlen_k <= INT32_MAX,
              "varlen_attention: max_seqlen_q/k must be in [0, 2^31)");
  // The kernels put query/key blocks of 32 or more rows on grid axis y (at most 65535 blocks).
  TORCH_CHECK(max_seqlen_q <= 65535 * 32 && max_seqlen_k <= 65535 * 32 && q.size(1) <= 65535,
              "varlen_attention (cuda): max_seqlen_q/k must be at most ", 65535 * 32, " and heads at most 65535");
  TORCH_CHECK(batch <= INT32_MAX && q.size(0) <= INT32_MAX && k.size(0) <= INT32_MAX,
              "varlen_attention (cuda): at most 2^31 - 1 sequences and tokens");
  VarlenAttentionShape shape{};
  shape.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  shape.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  shape.batch = static_cast<int>(batch);
  shape.heads_q = static_cast<int>(q.size(1));
  shape.heads_kv = static_cast<int>(k.size(1));
  shape.head_dim = static_cast<int>(q.size(2));
  shape.max_seqlen_q = static_cast<int>(max_seqlen_q);
  shape.max_seqlen_k = static_cast<int>(max_seqlen_k);
  shape.total_q = q.size(0);
  shape.total_k = k.size(0);
  shape.softmax_scale = static_cast<float>(softmax_scale);
  shape.causal = causal;
  shape.dtype = to_dtype(q);
  return shape;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const VarlenAttentionShape shape =
      make_shape(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  check_launch(varlen_attention_forward(shape, q.data_ptr(), strides_of(q), k.data_ptr(), strides_of(k),
                                        v.data_ptr(), strides_of(v), out.data_ptr(), strides_of(out),
                                        lse.data_ptr<float>(), current_stream()),
               "varlen_attention (cuda)");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, bool causal) {
  const VarlenAttentionShape shape =
      make_shape(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal);
  check_token_head_tensor(dout, "dout", q);
  check_token_head_tensor(out, "out", q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "varlen_attention_backward: dout and out must have the shape of q");
  TORCH_CHECK(lse.is_cuda() && lse.device() == q.device() && lse.scalar_type() == at::kFloat &&
                  lse.is_contiguous() && lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
              "varlen_attention_backward: lse must be a contiguous float32 [Hq, total_q] tensor on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  check_launch(varlen_attention_backward(shape, dout.data_ptr(), strides_of(dout), q.data_ptr(), strides_of(q),
                                         k.data_ptr(), strides_of(k), v.data_ptr(), strides_of(v), out.data_ptr(),
                                         strides_of(out), lse.data_ptr<float>(), dq.data_ptr(), strides_of(dq),
                                         dk.data_ptr(), strides_of(dk), dv.data_ptr(), strides_of(dv),
                                         delta.data_ptr<float>(), current_stream()),
               "varlen_attention_backward (cuda)");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace dpar

TORCH_LIBRARY_IMPL(dpar_C, CUDA, m) {
  m.impl("varlen_attention", &dpar::varlen_attention_cuda);
  m.impl("varlen_attention_backward", &dpar::varlen_attention_backward_cuda);
}
