// Python module entry of dpar_kernels._C (plus the direct eager entries of eager_calls.cpp). The ops themselves are
// registered with TORCH_LIBRARY_FRAGMENT(dpar_C, ...) in csrc/cpu/*.cpp (schemas + CPU kernels) and
// csrc/cuda_bindings/*.cpp (CUDA kernels).
// Only pybind11 here (no torch headers: they would cost a minute of compile time and nothing in this file uses them).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu/isa.h"

namespace dpar {
void register_eager_calls(pybind11::module& m);  // eager_calls.cpp
}  // namespace dpar

namespace {
bool built_with_cuda() {
#ifdef DPAR_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DPAR kernels: C++ CPU and CUDA ops, registered under torch.ops.dpar_C";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_isa", [] { return std::string(dpar::cpu::isa_name(dpar::cpu::active_isa())); },
        "The instruction-set path the C++ CPU kernels run: 'avx512', 'avx2' or 'default' (csrc/cpu/isa.h)");
  m.def("cpu_isa_supported", [] {
          std::vector<std::string> paths;
          for (auto isa : {dpar::cpu::Isa::kDefault, dpar::cpu::Isa::kAvx2, dpar::cpu::Isa::kAvx512}) {
            if (dpar::cpu::cpu_supports(isa)) paths.emplace_back(dpar::cpu::isa_name(isa));
          }
          return paths;
        }, "The paths this CPU can run, lowest first");
  m.def("cpu_isa_problem", [] { return dpar::cpu::isa_request_problem(); },
        "Why DPAR_CPU_ISA was not honoured, or '' when it was (or is unset)");
  dpar::register_eager_calls(m);
}
