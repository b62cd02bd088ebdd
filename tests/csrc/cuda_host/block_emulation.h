// Runs CUDA kernel code on the host, for tests without a GPU: the emulation shared by attention_emulation.cpp and
// kvcache_emulation.cpp (include it before the kernels).
//
// Each thread block runs as `threads` cooperative fibers (ucontext) on one OS thread: __syncthreads/__syncwarp are
// barriers that switch fibers until every thread of the block/warp has arrived, warp shuffles go through a per-warp
// exchange buffer, and dynamic shared memory is a per-block buffer poisoned with NaN bytes. Blocks run one after
// another. Needs the CUDA headers (types and fp16/bf16 conversions only).
#pragma once
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __launch_bounds__(...)  // defined by the CUDA headers for nvcc only

inline uint3 threadIdx;
inline uint3 blockIdx;

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

inline Block* current = nullptr;

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

inline unsigned char* shared_memory() { return current->smem; }

}  // namespace emulation

inline void __syncthreads() { emulation::wait(emulation::current->block_barrier); }

inline void __syncwarp(unsigned = 0xffffffffu) {
  emulation::wait(emulation::current->warp_barriers[threadIdx.x / emulation::kWarpSize]);
}

namespace emulation {

// Every lane publishes `value`, then reads lane source(lane)'s. Double-buffered: a lane can only write a buffer
// again after the next shuffle's barrier, which every lane reaches after reading this one.
template <typename Source>
inline float shuffle(float value, Source source) {
  auto& fiber = current->fibers[threadIdx.x];
  std::vector<float>& buffer = current->exchange[fiber.shuffle_parity];
  fiber.shuffle_parity ^= 1u;
  const int lane = threadIdx.x % kWarpSize, warp_base = threadIdx.x - lane;
  buffer[threadIdx.x] = value;
  __syncwarp();
  return buffer[warp_base + source(lane) % kWarpSize];
}

}  // namespace emulation

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  return emulation::shuffle(value, [=](int lane) { return lane ^ lane_mask; });
}

inline float __shfl_sync(unsigned, float value, int source_lane) {
  return emulation::shuffle(value, [=](int) { return source_lane; });
}

namespace emulation {

constexpr uint64_t kAllDone = ~uint64_t{0} - 1;

// A number that changes whenever a fiber of the block arrives at a barrier, passes one, or returns.
inline uint64_t progress(const Block& block) {
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

// Runs kernel() for every block of `grid` with `threads` threads and `smem_bytes` of shared memory aligned to
// `smem_align` bytes. A barrier that some threads never reach is reported as cudaErrorLaunchFailure.
inline cudaError_t run_grid(dim3 grid, int threads, int smem_bytes, int smem_align,
                            const std::function<void()>& kernel) {
  std::vector<unsigned char> smem(static_cast<size_t>(smem_bytes) + smem_align);
  unsigned char* aligned = smem.data() + (smem_align - reinterpret_cast<uintptr_t>(smem.data()) % smem_align);
  Block block;
  block.fibers.resize(threads);
  for (auto& fiber : block.fibers) fiber.stack.reset(new char[kStackBytes]);
  for (auto& buffer : block.exchange) buffer.assign(threads, 0.f);
  block.smem = aligned;
  static const std::function<void()>* entry;
  entry = &kernel;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(aligned, 0xff, smem_bytes);  // NaN in every float/half/bf16 view: stale reads show up
        block.block_barrier = {threads, 0, 0};
        block.warp_barriers.assign((threads + kWarpSize - 1) / kWarpSize, Barrier{kWarpSize, 0, 0});
        for (auto& fiber : block.fibers) {
          getcontext(&fiber.context);
          fiber.context.uc_stack.ss_sp = fiber.stack.get();
          fiber.context.uc_stack.ss_size = kStackBytes;
          fiber.context.uc_link = &block.scheduler;
          makecontext(&fiber.context, +[] {
            (*entry)();
            current->fibers[current->running].done = true;
          }, 0);
          fiber.done = false;
          fiber.shuffle_parity = 0;
        }
        current = &block;
        blockIdx = {x, y, z};
        // Round-robin until every fiber has returned; a round that changes nothing means a stuck barrier.
        for (uint64_t state = 0, previous = ~uint64_t{0}; state != previous;) {
          previous = state;
          for (int t = 0; t < threads; ++t) {
            if (block.fibers[t].done) continue;
            block.running = t;
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            swapcontext(&block.scheduler, &block.fibers[t].context);
          }
          state = progress(block);
          if (state == kAllDone) break;
        }
        if (progress(block) != kAllDone) {
          current = nullptr;
          return cudaErrorLaunchFailure;
        }
      }
    }
  }
  current = nullptr;
  return cudaSuccess;
}

}  // namespace emulation
