// Direct Python entries for the forward ops that run at decode time: each calls the registered torch.ops.dpar_C op
// through a C++ dispatcher handle looked up once, so it reaches the CPU or CUDA kernel of its inputs' device exactly
// as torch.ops.dpar_C.<name> does, minus the Python-side schema parsing of torch.ops (about 1.3 us per call on the
// 2-core CPU, a third of a decode-sized patch_gather). dpar_kernels uses them only on its eager fast path;
// torch.compile and autograd see the torch.library ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>  // the Tensor type casters, without the rest of torch/extension.h

#include <optional>
#include <tuple>

namespace dpar {
namespace {

using Tensor = at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<Tensor, Tensor> patch_gather(const Tensor& x, const Tensor& cu_tokens, c10::string_view reduce,
                                        bool with_argmax) {
  static const auto op =
      handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::string_view, bool)>("dpar_C::patch_gather");
  return op.call(x, cu_tokens, reduce, with_argmax);
}

Tensor patch_scatter(const Tensor& y, const Tensor& cu_tokens, int64_t total) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, int64_t)>("dpar_C::patch_scatter");
  return op.call(y, cu_tokens, total);
}

Tensor token_entropy(const Tensor& logits, double temperature) {
  static const auto op = handle<Tensor(const Tensor&, double)>("dpar_C::token_entropy");
  return op.call(logits, temperature);
}

std::tuple<Tensor, Tensor> varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                            const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
                                            bool causal) {
  static const auto op = handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, int64_t, int64_t, double, bool)>(
      "dpar_C::varlen_attention");
  return op.call(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
}

Tensor kvcache_attention(const Tensor& q, Tensor& k_cache, Tensor& v_cache, const Tensor& cache_seqlens,
                         const OptionalTensor& k, const OptionalTensor& v, double scale, bool causal) {
  static const auto op = handle<Tensor(const Tensor&, Tensor&, Tensor&, const Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, double, bool)>("dpar_C::kvcache_attention");
  return op.call(q, k_cache, v_cache, cache_seqlens, k, v, scale, causal);
}

Tensor linear(const Tensor& x, const Tensor& weight, const OptionalTensor& bias) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, const OptionalTensor&)>("dpar_C::linear");
  return op.call(x, weight, bias);
}

}  // namespace

void register_eager_calls(pybind11::module& m) {
  m.def("patch_gather", &patch_gather);
  m.def("patch_scatter", &patch_scatter);
  m.def("token_entropy", &token_entropy);
  m.def("varlen_attention", &varlen_attention);
  m.def("kvcache_attention", &kvcache_attention);
  m.def("linear", &linear);
}

}  // namespace dpar
