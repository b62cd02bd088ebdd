// Torch-free declarations shared by the CUDA launchers and their torch bindings.
// Launchers take raw pointers, sizes, a DType and a cudaStream_t, and return the cudaError_t of the launch.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace dpar {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

}  // namespace dpar
