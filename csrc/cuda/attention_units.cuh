// The GPU launchers of the varlen attention kernels, one compilation unit per (direction, head dim): each
// attention_{fwd,bwd}_d<D>.cu instantiates one of the templates below, so that a parallel build compiles the 93
// kernels in ten units of a few kernels each instead of one long unit (FlashAttention's split per head dim).
// attention.cu sees the extern declarations only.
#pragma once
#include "cuda/attention_kernels.cuh"

namespace dpar {
namespace attention {

constexpr unsigned kMaxGridYZ = 65535;

// Launches one kernel with `smem_bytes` of dynamic shared memory (above the default 48 KiB, so opted in first).
struct CudaLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream, const KernelArgs& args) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
    if (grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) return cudaErrorInvalidConfiguration;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
    return cudaGetLastError();
  }
};

// The forward / backward of head dim kD on the GPU (shape valid, head dim kD).
template <int kD>
cudaError_t forward_on_gpu(const KernelArgs& args, cudaStream_t stream) {
  return run_forward_head_dim<kD>(args, stream, CudaLaunch{});
}

template <int kD>
cudaError_t backward_on_gpu(const KernelArgs& args, const BackwardOutputs& outputs, cudaStream_t stream) {
  return run_backward_head_dim<kD>(args, outputs, stream, CudaLaunch{});
}

extern template cudaError_t forward_on_gpu<32>(const KernelArgs&, cudaStream_t);
extern template cudaError_t forward_on_gpu<64>(const KernelArgs&, cudaStream_t);
extern template cudaError_t forward_on_gpu<80>(const KernelArgs&, cudaStream_t);
extern template cudaError_t forward_on_gpu<96>(const KernelArgs&, cudaStream_t);
extern template cudaError_t forward_on_gpu<128>(const KernelArgs&, cudaStream_t);
extern template cudaError_t backward_on_gpu<32>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
extern template cudaError_t backward_on_gpu<64>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
extern template cudaError_t backward_on_gpu<80>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
extern template cudaError_t backward_on_gpu<96>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);
extern template cudaError_t backward_on_gpu<128>(const KernelArgs&, const BackwardOutputs&, cudaStream_t);

}  // namespace attention
}  // namespace dpar
