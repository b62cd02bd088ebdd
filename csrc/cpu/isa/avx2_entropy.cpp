// The avx2 path (x86-64-v3: AVX2, FMA, F16C, BMI1/2) of the entropy kernels:
// cpu/kernels/entropy.inc for this instruction set. How the paths are built and picked: cpu/isa.h.
#include "cpu/isa/prelude.h"

#if DPAR_X86_PATHS
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt,sse3,ssse3,sse4.1,sse4.2")
#define DPAR_VECTOR_BYTES 32

namespace dpar::cpu::isa_avx2 {
namespace {

#include "cpu/kernels/entropy.inc"

}  // namespace

const EntropyKernels entropy_kernels_table = make_table();

}  // namespace dpar::cpu::isa_avx2
#endif
