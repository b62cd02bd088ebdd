// GPU launchers of the varlen attention kernels (attention_kernels.cuh); see attention.h.
#include "cuda/attention.h"

#include "cuda/attention_kernels.cuh"

namespace dpar {
namespace {

constexpr unsigned kMaxGridYZ = 65535;

// Launches one kernel with `smem_bytes` of dynamic shared memory (above the default 48 KiB, so opted in first).
struct CudaLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream,
                         const attention::KernelArgs& args) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
    if (grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) return cudaErrorInvalidConfiguration;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, attention::kThreads, smem_bytes, stream>>>(args);
    return cudaGetLastError();
  }
};

}  // namespace

bool varlen_attention_supports_head_dim(int head_dim) { return attention::supported_head_dim(head_dim); }

cudaError_t varlen_attention_forward(const VarlenAttentionShape& shape, const void* q, TokenHeadStrides q_strides,
                                     const void* k, TokenHeadStrides k_strides, const void* v,
                                     TokenHeadStrides v_strides, void* out, TokenHeadStrides out_strides, float* lse,
                                     cudaStream_t stream) {
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
  return attention::run_forward(args, stream, CudaLaunch{});
}

cudaError_t varlen_attention_backward(const VarlenAttentionShape& shape, const void* dout,
                                      TokenHeadStrides dout_strides, const void* q, TokenHeadStrides q_strides,
                                      const void* k, TokenHeadStrides k_strides, const void* v,
                                      TokenHeadStrides v_strides, const void* out, TokenHeadStrides out_strides,
                                      const float* lse, void* dq, TokenHeadStrides dq_strides, void* dk,
                                      TokenHeadStrides dk_strides, void* dv, TokenHeadStrides dv_strides,
                                      float* delta_workspace, cudaStream_t stream) {
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
  return attention::run_backward(args, delta_workspace, dq, dq_strides, dk, dk_strides, dv, dv_strides, stream, CudaLaunch{});
}

}  // namespace dpar
