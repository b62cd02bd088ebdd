// Picks the instruction-set path once, when the library loads (see cpu/isa.h), and hands out its kernel tables.
#include "cpu/isa.h"

#include <cstdlib>
#include <string>

#include "cpu/kernels/tables.h"

namespace dpar::cpu {
namespace {

struct Choice {
  Isa isa;
  std::string problem;
};

Isa best_supported() {
  if (cpu_supports(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_supports(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kDefault;
}

std::string supported_list() {
  std::string names;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kDefault}) {
    if (!cpu_supports(isa)) continue;
    names += names.empty() ? "" : ", ";
    names += isa_name(isa);
  }
  return names;
}

Choice choose() {
  const Isa best = best_supported();
  const char* requested = std::getenv("DPAR_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return {best, ""};
  const std::string name(requested);
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kDefault}) {
    if (name != isa_name(isa)) continue;
    if (cpu_supports(isa)) return {isa, ""};
    return {best, "DPAR_CPU_ISA=" + name + " asks for a path this CPU cannot run (it supports " + supported_list() +
                      "); using " + isa_name(best)};
  }
  return {best, "DPAR_CPU_ISA=" + name + " is not one of avx512, avx2, default; using " + isa_name(best)};
}

const Choice& choice() {
  static const Choice chosen = choose();
  return chosen;
}

// Evaluated when the library loads, so the path is fixed before any kernel runs.
[[maybe_unused]] const Isa kChosenAtLoad = choice().isa;

template <typename Table>
const Table& pick(const Table& default_path, const Table* avx2_path, const Table* avx512_path) {
  switch (active_isa()) {
    case Isa::kAvx512: return *avx512_path;
    case Isa::kAvx2: return *avx2_path;
    default: return default_path;
  }
}

#if DPAR_X86_PATHS
#define DPAR_PICK(table) pick(isa_default::table, &isa_avx2::table, &isa_avx512::table)
#else
#define DPAR_PICK(table) pick(isa_default::table, nullptr, nullptr)
#endif

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

bool cpu_supports(Isa isa) {
#if DPAR_X86_PATHS
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512: return __builtin_cpu_supports("x86-64-v4");
    case Isa::kAvx2: return __builtin_cpu_supports("x86-64-v3");
    default: return true;
  }
#else
  return isa == Isa::kDefault;
#endif
}

Isa active_isa() { return choice().isa; }

const std::string& isa_request_problem() { return choice().problem; }

const AttentionKernels& attention_kernels() {
  static const AttentionKernels& table = DPAR_PICK(attention_kernels_table);
  return table;
}
const KvcacheKernels& kvcache_kernels() {
  static const KvcacheKernels& table = DPAR_PICK(kvcache_kernels_table);
  return table;
}
const LinearKernels& linear_kernels() {
  static const LinearKernels& table = DPAR_PICK(linear_kernels_table);
  return table;
}
const EntropyKernels& entropy_kernels() {
  static const EntropyKernels& table = DPAR_PICK(entropy_kernels_table);
  return table;
}
const GatherScatterKernels& gather_scatter_kernels() {
  static const GatherScatterKernels& table = DPAR_PICK(gather_scatter_kernels_table);
  return table;
}

}  // namespace dpar::cpu
