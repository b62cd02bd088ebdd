// The avx512 path (x86-64-v4: AVX-512 F/BW/CD/DQ/VL) of the gather_scatter kernels:
// cpu/kernels/gather_scatter.inc for this instruction set. How the paths are built and picked: cpu/isa.h.
#include "cpu/isa/prelude.h"

#if DPAR_X86_PATHS
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt,sse3,ssse3,sse4.1,sse4.2,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")
#define DPAR_VECTOR_BYTES 64

namespace dpar::cpu::isa_avx512 {
namespace {

#include "cpu/kernels/gather_scatter.inc"

}  // namespace

const GatherScatterKernels gather_scatter_kernels_table = make_table();

}  // namespace dpar::cpu::isa_avx512
#endif
