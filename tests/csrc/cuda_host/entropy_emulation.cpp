// Runs the CUDA token_entropy kernel (csrc/cuda/entropy.cu) on the host, for tests without a GPU.
//
// Each thread block runs as kThreads OS threads: __syncthreads is a block barrier, warp shuffles go through a
// double-buffered per-warp exchange with a warp barrier, and __shared__ arrays become function statics (blocks run
// one after another, so a static is exactly one block's shared memory). Built as a shared library by
// tests/csrc/test_cuda_entropy_host.py and called through ctypes with torch CPU tensors standing in for device memory.
// Needs the CUDA headers (types and fp16/bf16 conversions only).
#define DPAR_ENTROPY_HOST_EMULATION 1

#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __launch_bounds__(...)  // defined by the CUDA headers for nvcc only
#undef __shared__
#define __shared__ static

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

namespace emulation {

constexpr int kWarpSize = 32;

struct Block {
  explicit Block(int threads) : block_barrier(threads) {
    for (int w = 0; w < threads / kWarpSize; ++w) warp_barriers.emplace_back(new std::barrier<>(kWarpSize));
    for (auto& buffer : exchange) buffer.assign(threads, 0.f);
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> exchange[2];
};

Block* current = nullptr;
thread_local unsigned shuffle_parity = 0;

}  // namespace emulation

inline void __syncthreads() { emulation::current->block_barrier.arrive_and_wait(); }

// A lane writes a buffer again only after the next shuffle's barrier, which every lane reaches after reading it.
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  std::vector<float>& buffer = emulation::current->exchange[emulation::shuffle_parity];
  emulation::shuffle_parity ^= 1u;
  const int lane = threadIdx.x % emulation::kWarpSize, warp_base = threadIdx.x - lane;
  buffer[threadIdx.x] = value;
  emulation::current->warp_barriers[threadIdx.x / emulation::kWarpSize]->arrive_and_wait();
  return buffer[warp_base + (lane ^ lane_mask)];
}

#include "cuda/entropy.cu"

namespace {

template <typename T, int WARPS_PER_ROW>
void run(const T* logits, float* out, int64_t rows, int64_t vocab, int64_t row_stride, float inv_t) {
  constexpr int64_t kRowsPerBlock = dpar::kWarps / WARPS_PER_ROW;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    emulation::Block block(dpar::kThreads);
    emulation::current = &block;
    std::vector<std::thread> threads;
    for (int t = 0; t < dpar::kThreads; ++t) {
      threads.emplace_back([=] {
        threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
        blockIdx = uint3{static_cast<unsigned>(b), 0, 0};
        emulation::shuffle_parity = 0;
        dpar::token_entropy_kernel<T, WARPS_PER_ROW>(logits, out, rows, vocab, row_stride, inv_t);
      });
    }
    for (auto& thread : threads) thread.join();
  }
  emulation::current = nullptr;
}

}  // namespace

// Same arguments and launch choice (one warp per row up to kWarpRowVocab, else one block) as launch_token_entropy.
extern "C" int dpar_emulated_token_entropy(int dtype, const void* logits, float* out, int64_t rows, int64_t vocab,
                                           int64_t row_stride, float inv_temperature) {
  if (rows == 0) return 0;
  if (vocab <= 0 || !(inv_temperature > 0.f)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(dpar::dispatch_dtype(static_cast<dpar::DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits);
    if (vocab <= dpar::kWarpRowVocab) {
      run<T, 1>(x, out, rows, vocab, row_stride, inv_temperature);
    } else {
      run<T, dpar::kWarps>(x, out, rows, vocab, row_stride, inv_temperature);
    }
    return cudaSuccess;
  }));
}
