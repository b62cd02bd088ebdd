// GPU launchers of the varlen attention kernels; see attention.h. The kernels are compiled in the units of
// attention_units.cuh (one per direction and head dim); this file only picks the unit of the shape's head dim.
#include "cuda/attention.h"

#include "cuda/attention_units.cuh"

namespace dpar {

bool varlen_attention_supports_head_dim(int head_dim) { return attention::supported_head_dim(head_dim); }

cudaError_t varlen_attention_forward(const VarlenAttentionShape& shape, const void* q, TokenHeadStrides q_strides,
                                     const void* k, TokenHeadStrides k_strides, const void* v,
                                     TokenHeadStrides v_strides, void* out, TokenHeadStrides out_strides, float* lse,
                                     cudaStream_t stream) {
  if (!attention::valid_shape(shape)) return cudaErrorInvalidValue;
  attention::KernelArgs args{};
  args.shape = shape;
  args.q = q;
  args.k = k;
  args.v = v;
  args.result0 = out;
  args.stats_out = lse;
  args.q_strides = q_strides;
  args.k_strides = k_strides;
  args.v_strides = v_strides;
  args.result0_strides = out_strides;
  return attention::dispatch_head_dim(shape, [&](auto dim_tag) {
    return attention::forward_on_gpu<decltype(dim_tag)::value>(args, stream);
  });
}

cudaError_t varlen_attention_backward(const VarlenAttentionShape& shape, const void* dout,
                                      TokenHeadStrides dout_strides, const void* q, TokenHeadStrides q_strides,
                                      const void* k, TokenHeadStrides k_strides, const void* v,
                                      TokenHeadStrides v_strides, const void* out, TokenHeadStrides out_strides,
                                      const float* lse, void* dq, TokenHeadStrides dq_strides, void* dk,
                                      TokenHeadStrides dk_strides, void* dv, TokenHeadStrides dv_strides,
                                      float* delta_workspace, cudaStream_t stream) {
  if (!attention::valid_shape(shape)) return cudaErrorInvalidValue;
  attention::KernelArgs args{};
  args.shape = shape;
  args.q = q;
  args.k = k;
  args.v = v;
  args.out = out;
  args.dout = dout;
  args.lse = lse;
  args.q_strides = q_strides;
  args.k_strides = k_strides;
  args.v_strides = v_strides;
  args.out_strides = out_strides;
  args.dout_strides = dout_strides;
  const attention::BackwardOutputs outputs{delta_workspace, dq, dq_strides, dk, dk_strides, dv, dv_strides};
  return attention::dispatch_head_dim(shape, [&](auto dim_tag) {
    return attention::backward_on_gpu<decltype(dim_tag)::value>(args, outputs, stream);
  });
}

}  // namespace dpar
