// Torch-free SIMD reduction shared by the CPU kernels: transpose_sum folds W vectors into one vector of their
// horizontal sums (kvcache.cpp: scores of 16 keys at a time; linear.cpp: dot products of a register tile).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/attention_tiles.h"

namespace dpar::cpu {

using attention::Simd;

// Lane masks of one transpose_sum level with fold width H: lane i lies at offset i % 2H of its 2H-lane block.
template <typename T, int H>
struct FoldMasks {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I ivec __attribute__((vector_size(64)));
  static DPAR_INLINE ivec lower_half() {  // -1 on the first H lanes of each block
    ivec mask;
    for (int i = 0; i < Simd<T>::kWidth; ++i) mask[i] = i % (2 * H) < H ? -1 : 0;
    return mask;
  }
  static DPAR_INLINE ivec swap_halves() {  // lane i <- lane i + H or i - H within its block
    ivec index;
    for (int i = 0; i < Simd<T>::kWidth; ++i) index[i] = i % (2 * H) < H ? i + H : i - H;
    return index;
  }
};

// y[i] = x[index[i]] for a constant index vector (a one-source permute; clang has no __builtin_shuffle and turns
// the lane loop into one).
template <typename V, typename I>
DPAR_INLINE V permute(V x, I index) {
#if defined(__clang__)
  V y;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(x[0])); ++i) y[i] = x[index[i]];
  return y;
#else
  return __builtin_shuffle(x, index);
#endif
}

// One level of transpose_sum with N vectors left (H = N / 2): x[i] <- the 2H-lane blocks of x[i] and x[i + H]
// folded to H lanes each, x[i]'s in the first half of each block: (a_lo | b_hi) + swap(b_lo | a_hi), i.e. two
// blends, one one-source permute and one add per pair.
template <typename T, int N>
DPAR_INLINE void fold_level(typename Simd<T>::vec* x) {
  if constexpr (N > 1) {
    constexpr int H = N / 2;
    using M = FoldMasks<T, H>;
    const typename M::ivec lower = M::lower_half(), swap = M::swap_halves();
    for (int i = 0; i < H; ++i) {
      const typename Simd<T>::vec a = x[i], b = x[i + H];
      x[i] = (lower ? a : b) + permute(lower ? b : a, swap);
    }
    fold_level<T, H>(x);
  }
}

// -> a vector whose lane i is the sum of the lanes of x[i] (x is clobbered): log2(W) levels of blends, permutes
// and adds, W - 1 vector adds in all instead of a horizontal reduction per vector.
template <typename T>
DPAR_INLINE typename Simd<T>::vec transpose_sum(typename Simd<T>::vec* x) {
  fold_level<T, Simd<T>::kWidth>(x);
  return x[0];
}

}  // namespace dpar::cpu
