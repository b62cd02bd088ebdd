// Included first by every path file csrc/cpu/isa/<path>_<op>.cpp, before its `#pragma GCC target`: every standard
// header and kernel-table declaration the kernel bodies use, so that their inline and template code is compiled for
// the baseline target (see the ODR note in cpu/isa.h). A body includes nothing itself.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "cpu/isa.h"
#include "cpu/kernels/tables.h"

#define DPAR_INLINE inline __attribute__((always_inline))

// 64-byte vectors passed by value between the internal helpers of one path: the ABI note GCC emits for them
// (-Wpsabi) concerns calls between files, which never happen.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
