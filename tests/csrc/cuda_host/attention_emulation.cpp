// Runs the CUDA attention kernels (csrc/cuda/attention_kernels.cuh) on the host, for tests without a GPU.
//
// Each thread block runs as kThreads cooperative fibers (ucontext) on one OS thread: __syncthreads/__syncwarp are
// barriers that switch fibers until every thread of the block/warp has arrived, warp shuffles go through a per-warp
// exchange buffer, shared memory is a per-block buffer poisoned with NaN bytes, and wmma fragments are emulated by
// 16x16 fp32 tiles distributed over the lanes (each lane computes and stores 8 elements). Built as a shared
// library by tests/csrc/test_cuda_attention_host.py and called through ctypes with torch CPU tensors standing in for
// device memory. Needs the CUDA headers (types and fp16/bf16 conversions only).
#define DPAR_ATTENTION_HOST_EMULATION 1

#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cuda/common.cuh"

#define __launch_bounds__(...)  // defined by the CUDA headers for nvcc only

uint3 threadIdx;
uint3 blockIdx;

namespace emulation {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  unsigned shuffle_parity = 0;
};

// One thread block in flight: its fibers, barriers, shared memory and shuffle buffers.
struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> exchange[2];
  unsigned char* smem = nullptr;
  int running = 0;  // index of the fiber in control
};

Block* current = nullptr;

inline void yield() { swapcontext(&current->fibers[current->running].context, &current->scheduler); }

inline void wait(Barrier& barrier) {
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

}  // namespace emulation

inline void __syncthreads() { emulation::wait(emulation::current->block_barrier); }

inline void __syncwarp(unsigned = 0xffffffffu) {
  emulation::wait(emulation::current->warp_barriers[threadIdx.x / emulation::kWarpSize]);
}

// Double-buffered: a lane can only write a buffer again after the next shuffle's barrier, which every lane reaches
// after reading this one.
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  auto& fiber = emulation::current->fibers[threadIdx.x];
  std::vector<float>& buffer = emulation::current->exchange[fiber.shuffle_parity];
  fiber.shuffle_parity ^= 1u;
  const int lane = threadIdx.x % emulation::kWarpSize, warp_base = threadIdx.x - lane;
  buffer[threadIdx.x] = value;
  __syncwarp();
  return buffer[warp_base + (lane ^ lane_mask)];
}

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

unsigned char* shared_bytes() { return emulation::current->smem; }

namespace {

constexpr uint64_t kAllDone = ~uint64_t{0} - 1;

// A number that changes whenever a fiber of the block arrives at a barrier, passes one, or returns.
uint64_t progress(const emulation::Block& block) {
  uint64_t state = 0, done = 0;
  for (const auto& fiber : block.fibers) done += fiber.done ? 1 : 0;
  if (done == block.fibers.size()) return kAllDone;
  auto mix = [&state](uint64_t x) { state = state * 1000003u + x; };
  mix(done);
  mix(block.block_barrier.arrived);
  mix(block.block_barrier.generation);
  for (const auto& barrier : block.warp_barriers) {
    mix(barrier.arrived);
    mix(barrier.generation);
  }
  return state;
}

// Runs every block of the grid, one after another, as kThreads fibers scheduled round-robin.
struct HostLaunch {
  template <typename Kernel>
  cudaError_t operator()(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t, const KernelArgs& args) const {
    std::vector<unsigned char> smem(static_cast<size_t>(smem_bytes) + kSmemAlign);
    unsigned char* aligned = smem.data() + (kSmemAlign - reinterpret_cast<uintptr_t>(smem.data()) % kSmemAlign);
    emulation::Block block;
    block.fibers.resize(kThreads);
    for (auto& fiber : block.fibers) fiber.stack.reset(new char[emulation::kStackBytes]);
    for (auto& buffer : block.exchange) buffer.assign(kThreads, 0.f);
    block.smem = aligned;
    static Kernel entry_kernel;
    static const KernelArgs* entry_args;
    entry_kernel = kernel;
    entry_args = &args;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          std::memset(aligned, 0xff, smem_bytes);  // NaN in every float/half/bf16 view: stale reads show up
          block.block_barrier = {kThreads, 0, 0};
          block.warp_barriers.assign(kWarps, emulation::Barrier{emulation::kWarpSize, 0, 0});
          for (auto& fiber : block.fibers) {
            getcontext(&fiber.context);
            fiber.context.uc_stack.ss_sp = fiber.stack.get();
            fiber.context.uc_stack.ss_size = emulation::kStackBytes;
            fiber.context.uc_link = &block.scheduler;
            makecontext(&fiber.context, +[] {
              entry_kernel(*entry_args);
              emulation::current->fibers[emulation::current->running].done = true;
            }, 0);
            fiber.done = false;
            fiber.shuffle_parity = 0;
          }
          emulation::current = &block;
          blockIdx = {x, y, z};
          // Round-robin until every fiber has returned. A round that changes nothing (no barrier arrival or
          // release, no fiber returning) means a barrier some threads never reach: report it as a launch failure.
          for (uint64_t state = 0, previous = ~uint64_t{0}; state != previous;) {
            previous = state;
            for (int t = 0; t < kThreads; ++t) {
              if (block.fibers[t].done) continue;
              block.running = t;
              threadIdx = {static_cast<unsigned>(t), 0, 0};
              swapcontext(&block.scheduler, &block.fibers[t].context);
            }
            state = progress(block);
            if (state == kAllDone) break;
          }
          if (progress(block) != kAllDone) return cudaErrorLaunchFailure;
        }
      }
    }
    emulation::current = nullptr;
    return cudaSuccess;
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
  return dpar::attention::run_backward(args, delta, dq, TokenHeadStrides{strides[10], strides[11]}, dk,
                                       TokenHeadStrides{strides[12], strides[13]}, dv,
                                       TokenHeadStrides{strides[14], strides[15]}, nullptr,
                                       dpar::attention::HostLaunch{});
}
