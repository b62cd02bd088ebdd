// Python module entry of dpar_kernels._C (plus the direct eager entries of eager_calls.cpp). The ops themselves are
// registered with TORCH_LIBRARY_FRAGMENT(dpar_C, ...) in csrc/cpu/*.cpp (schemas + CPU kernels) and
// csrc/cuda_bindings/*.cpp (CUDA kernels).
#include <torch/extension.h>

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
  dpar::register_eager_calls(m);
}
