// Runs the CUDA attention kernels (csrc/cuda/attention_kernels.cuh) on the host, for tests without a GPU.
//
// Threads are fibers (block_emulation.h); wmma fragments are emulated by 16x16 fp32 tiles distributed over the lanes
// (each lane computes and stores 8 elements). Built as a shared library by tests/csrc/test_cuda_attention_host.py and
// called through ctypes with torch CPU tensors standing in for device memory.
#define DPAR_ATTENTION_HOST_EMULATION 1

#include "block_emulation.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Element (i, j) of a 16x16 tile belongs to lane (i % 2) * 16 + j, which is the only lane that computes and stores
// it; a lane loads just the rows of A and the column of B its elements need.
inline int lane() { return threadIdx.x % emulation::kWarpSize; }
inline bool owns(int i, int j) { return (i % 2) * 16 + j == lane(); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the kernels use 16x16x16 fragments only");
  float x[16 * 16];  // row-major 16x16 tile; only the entries this lane needs are set
};

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& e : f.x) e = value;
}

// matrix_a holds A(i, k), matrix_b holds B(k, j), both row-major in x.
template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  for (int i = lane() / 16; i < 16; i += 2) {
    for (int k = 0; k < 16; ++k) {
      f.x[i * 16 + k] = dpar::to_float(std::is_same<Layout, row_major>::value ? p[i * ldm + k] : p[k * ldm + i]);
    }
  }
}

template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  const int j = lane() % 16;
  for (int k = 0; k < 16; ++k) {
    f.x[k * 16 + j] = dpar::to_float(std::is_same<Layout, row_major>::value ? p[k * ldm + j] : p[j * ldm + k]);
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      if (owns(i, j)) f.x[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
    }
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      if (owns(i, j)) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * 16 + j];
    }
  }
}

template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      if (!owns(i, j)) continue;
      float sum = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) sum = std::fma(a.x[i * 16 + k], b.x[k * 16 + j], sum);
      d.x[i * 16 + j] = sum;
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda

#include "cuda/attention_kernels.cuh"

namespace dpar {
namespace attention {

unsigned char* shared_bytes() { return emulation::shared_memory(); }

namespace {

struct HostLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t, const KernelArgs& args) const {
    return emulation::run_grid(grid, kThreads, smem_bytes, kSmemAlign, [&] { kernel(args); });
  }
};

VarlenAttentionShape make_shape(int dtype, const int32_t* cu_q, const int32_t* cu_k, int batch, int heads_q,
                                int heads_kv, int head_dim, int max_q, int max_k, int64_t total_q, float scale,
                                int causal) {
  VarlenAttentionShape shape{};
  shape.cu_seqlens_q = cu_q;
  shape.cu_seqlens_k = cu_k;
  shape.batch = batch;
  shape.heads_q = heads_q;
  shape.heads_kv = heads_kv;
  shape.head_dim = head_dim;
  shape.max_seqlen_q = max_q;
  shape.max_seqlen_k = max_k;
  shape.total_q = total_q;
  shape.total_k = cu_k[batch];  // the harness passes valid host offsets
  shape.softmax_scale = scale;
  shape.causal = causal != 0;
  shape.dtype = static_cast<DType>(dtype);
  return shape;
}

}  // namespace
}  // namespace attention
}  // namespace dpar

using dpar::TokenHeadStrides;

// strides: (token, head) pairs in elements, in the order of the tensor arguments.
extern "C" int dpar_emulated_forward(int dtype, const int32_t* cu_q, const int32_t* cu_k, int batch, int heads_q,
                                     int heads_kv, int head_dim, int max_q, int max_k, int64_t total_q, float scale,
                                     int causal, const void* q, const void* k, const void* v, void* out, float* lse,
                                     const int64_t* strides) {
  dpar::attention::KernelArgs args{};
  args.shape = dpar::attention::make_shape(dtype, cu_q, cu_k, batch, heads_q, heads_kv, head_dim, max_q, max_k,
                                           total_q, scale, causal);
  args.q = q;
  args.k = k;
  args.v = v;
  args.result0 = out;
  args.stats_out = lse;
  args.q_strides = {strides[0], strides[1]};
  args.k_strides = {strides[2], strides[3]};
  args.v_strides = {strides[4], strides[5]};
  args.result0_strides = {strides[6], strides[7]};
  return dpar::attention::run_forward(args, nullptr, dpar::attention::HostLaunch{});
}

extern "C" int dpar_emulated_backward(int dtype, const int32_t* cu_q, const int32_t* cu_k, int batch, int heads_q,
                                      int heads_kv, int head_dim, int max_q, int max_k, int64_t total_q, float scale,
                                      int causal, const void* dout, const void* q, const void* k, const void* v,
                                      const void* out, const float* lse, void* dq, void* dk, void* dv, float* delta,
                                      const int64_t* strides) {
  dpar::attention::KernelArgs args{};
  args.shape = dpar::attention::make_shape(dtype, cu_q, cu_k, batch, heads_q, heads_kv, head_dim, max_q, max_k,
                                           total_q, scale, causal);
  args.dout = dout;
  args.q = q;
  args.k = k;
  args.v = v;
  args.out = out;
  args.lse = lse;
  args.dout_strides = {strides[0], strides[1]};
  args.q_strides = {strides[2], strides[3]};
  args.k_strides = {strides[4], strides[5]};
  args.v_strides = {strides[6], strides[7]};
  args.out_strides = {strides[8], strides[9]};
  const dpar::attention::BackwardOutputs outputs{delta, dq, TokenHeadStrides{strides[10], strides[11]}, dk,
                                                 TokenHeadStrides{strides[12], strides[13]}, dv,
                                                 TokenHeadStrides{strides[14], strides[15]}};
  return dpar::attention::run_backward(args, outputs, nullptr, dpar::attention::HostLaunch{});
}
