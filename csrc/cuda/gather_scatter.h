// Torch-free launchers of the CUDA patch gather / spread kernels (see gather_scatter.cu).
// Shapes: src rows [*, cols] with a free row stride (elements), cu_tokens int32 [num_patches+1] device offsets
// (validated by the caller), outputs contiguous. One block per (patch, column tile); no atomics.
#pragma once
#include <cstdint>

#include "cuda/common.h"

namespace dpar {

enum class GatherReduce : int { Max = 0, Sum = 1, Mean = 2 };

// What each token row receives from its patch row in patch_spread.
enum class SpreadMode : int {
  Copy = 0,         // the patch row (patch_scatter, backward of sum)
  Mean = 1,         // the patch row / patch length (backward of mean)
  ArgmaxRoute = 2,  // the patch row in the columns where the token is the arg-max, 0 elsewhere (backward of max)
};

// x [total, cols] (row stride x_row_stride) -> out [num_patches, cols]; argmax int32 [num_patches, cols] is written
// only for Max when non-null (first arg-max token, -1 for an empty patch or a NaN column); null skips it.
cudaError_t launch_patch_gather(const void* x, int64_t x_row_stride, const int32_t* cu_tokens, int64_t num_patches,
                                int64_t total, int64_t cols, GatherReduce reduce, void* out, int32_t* argmax,
                                DType dtype, cudaStream_t stream);

// src [num_patches, cols] (row stride src_row_stride) -> out [total, cols]; argmax [num_patches, cols] contiguous,
// read only for ArgmaxRoute.
cudaError_t launch_patch_spread(const void* src, int64_t src_row_stride, const int32_t* cu_tokens,
                                const int32_t* argmax, int64_t num_patches, int64_t total, int64_t cols,
                                SpreadMode mode, void* out, DType dtype, cudaStream_t stream);

}  // namespace dpar
