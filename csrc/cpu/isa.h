// CPU instruction-set paths of the C++ kernels: one table of kernel functions per path, chosen once at load time.
//
// Paths: "avx512" (x86-64-v4: AVX-512 F/BW/CD/DQ/VL), "avx2" (x86-64-v3: AVX2, FMA, F16C, BMI1/2) and "default"
// (baseline x86-64, SSE2; the only path on other architectures). The path is picked from CPU feature bits
// (__builtin_cpu_supports), never from the CPU model, when the library loads: the best one the CPU has, or the one
// the environment variable DPAR_CPU_ISA=avx512|avx2|default asks for. A request the CPU cannot run (a higher path
// than it supports) or an unknown name is not honoured: the best supported path runs instead and
// isa_request_problem() says why (dpar_kernels warns with that text when it loads the extension).
//
// How the per-path code is built, and why it is safe to link together (the ODR hazard):
// * The math of each op lives in a torch-free kernel body, csrc/cpu/kernels/<op>.inc. Each path compiles it in
//   its own translation unit, csrc/cpu/isa/<path>_<op>.cpp, which includes cpu/isa/prelude.h (every standard
//   header a body uses), then switches the instruction set with `#pragma GCC target(...)`, then includes the body.
//   The build flags stay the same for every file (no -mavx2), so one ninja command line builds them all, in
//   parallel.
// * Everything a body defines sits in a path namespace (isa_avx2, ...) and, inside it, an anonymous namespace:
//   internal linkage, so no AVX2/AVX-512 copy of a body's inline or template function can be merged by the linker
//   with another path's copy. The only external symbol of a path file is its kernel table (a constant object of
//   function pointers, declared in cpu/kernels/<op>.h).
// * Standard-library templates and inline functions (std::fill, std::max, ...) are defined by the prelude before the
//   pragma, so GCC compiles them for the baseline target: where they are inlined into a path's code they take its
//   instruction set, and the out-of-line (weak, merged) copies the linker may share with other files are baseline
//   code, the same in every object file. Bodies include no torch or c10 header (their inline code would be emitted
//   under the pragma): tensors enter as raw pointers, float16 / bfloat16 as uint16_t bits.
// * The vector width of a body is the path's native width (DPAR_VECTOR_BYTES: 64 / 32 / 16), so register tiles fit
//   the path's register file; buffers shared with the torch-side code are padded to kMaxVectorBytes, a multiple of
//   every path's width.
#pragma once

#include <cstdint>
#include <string>

namespace dpar::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// "default", "avx2" or "avx512".
const char* isa_name(Isa isa);

// Whether this CPU (and OS) can run the path's instructions.
bool cpu_supports(Isa isa);

// The path every kernel table runs, fixed when the library loads (see above).
Isa active_isa();

// Empty when DPAR_CPU_ISA is unset or honoured; otherwise why it was not (the path used instead is active_isa()).
const std::string& isa_request_problem();

// Widest vector of any path, in bytes; rows that the torch-side code lays out for a kernel are padded to it.
constexpr int64_t kMaxVectorBytes = 64;

// n rounded up to a whole number of the widest vectors of T.
template <typename T>
constexpr int64_t padded_len(int64_t n) {
  constexpr int64_t lanes = kMaxVectorBytes / sizeof(T);
  return (n + lanes - 1) / lanes * lanes;
}

}  // namespace dpar::cpu

// The avx2 / avx512 paths are built with GCC on x86-64 (`#pragma GCC target`); elsewhere only "default" exists.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DPAR_X86_PATHS 1
#else
#define DPAR_X86_PATHS 0
#endif
