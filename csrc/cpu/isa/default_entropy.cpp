// The default path (baseline x86-64, SSE2; elsewhere the target's baseline) of the entropy kernels:
// cpu/kernels/entropy.inc for this instruction set. How the paths are built and picked: cpu/isa.h.
#include "cpu/isa/prelude.h"

#define DPAR_VECTOR_BYTES 16

namespace dpar::cpu::isa_default {
namespace {

#include "cpu/kernels/entropy.inc"

}  // namespace

const EntropyKernels entropy_kernels_table = make_table();

}  // namespace dpar::cpu::isa_default
