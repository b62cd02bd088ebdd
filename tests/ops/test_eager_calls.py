"""The direct eager entries of dpar_kernels._C (csrc/eager_calls.cpp) call the same registered ops as torch.ops."""
import pytest
import torch

import dpar_kernels as dk
from dpar_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="the C++ extension is not built")
C = _extension.EXTENSION


def _offsets(lengths):
    return dk.lengths_to_cu_seqlens(torch.tensor(lengths, dtype=torch.int32))


def _same(direct, registered):
    direct = direct if isinstance(direct, tuple) else (direct,)
    registered = registered if isinstance(registered, tuple) else (registered,)
    assert len(direct) == len(registered)
    for a, b in zip(direct, registered):
        assert torch.equal(a, b)


def test_gather_scatter_and_entropy_match_torch_ops():
    x, cu = torch.randn(9, 5), _offsets([2, 0, 4, 3])
    ops = torch.ops.dpar_C
    for reduce in ("max", "sum", "mean"):
        _same(C.patch_gather(x, cu, reduce, reduce == "max"), ops.patch_gather(x, cu, reduce, reduce == "max"))
    y = torch.randn(4, 5)
    _same(C.patch_scatter(y, cu, 9), ops.patch_scatter(y, cu, 9))
    logits = torch.randn(6, 33)
    _same(C.token_entropy(logits, 0.7), ops.token_entropy(logits, 0.7))


def test_attention_entries_match_torch_ops():
    q = torch.randn(7, 2, 16)
    cu = _offsets([3, 4])
    _same(C.varlen_attention(q, q, q, cu, cu, 4, 4, 0.25, True),
          torch.ops.dpar_C.varlen_attention(q, q, q, cu, cu, 4, 4, 0.25, True))
    q, new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16)
    k_cache, v_cache = torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    caches = [k_cache.clone(), v_cache.clone(), k_cache, v_cache]
    lengths = torch.tensor([0, 5], dtype=torch.int32)
    direct = C.kvcache_attention(q, caches[0], caches[1], lengths, new, new, 0.25, True)
    registered = torch.ops.dpar_C.kvcache_attention(q, caches[2], caches[3], lengths, new, new, 0.25, True)
    _same((direct, caches[0], caches[1]), (registered, caches[2], caches[3]))  # the caches are updated alike


def test_a_bad_argument_is_an_exception_not_a_crash():
    with pytest.raises(TypeError, match="int32"):
        C.patch_gather(torch.randn(4, 3), torch.tensor([0, 4]), "max", False)
    with pytest.raises(TypeError):
        C.patch_gather(torch.randn(4, 3), None, "max", False)


def test_compiled_graphs_call_the_kvcache_extension_op():
    """Under torch.compile the cpu backend is the C++ op itself (no Python custom op per decode layer), and the
    in-place cache update survives functionalization."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    q, new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16)
    k_cache, v_cache = torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    lengths = torch.tensor([0, 5], dtype=torch.int32)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = dk.kvcache_attention(q, eager_k, eager_v, lengths, new, new, backend="cpu")

    def step(q, k_cache, v_cache, lengths, new):
        return dk.kvcache_attention(q, k_cache, v_cache, lengths, new, new, backend="cpu") * 1.0

    recorder = EagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=recorder)(q, k_cache, v_cache, lengths, new)
    assert torch.equal(compiled, expected)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)
    targets = [str(node.target) for graph in recorder.graphs for node in graph.graph.nodes]
    assert "dpar_C.kvcache_attention" in targets and "dpar.kvcache_attention" not in targets, targets
    inductor = torch.compile(step, fullgraph=True)(q, k_cache.clone(), v_cache.clone(), lengths, new)
    assert torch.equal(inductor, expected)


def test_direct_calls_take_parameters_but_not_other_subclasses():
    """A model's weights are nn.Parameters (linear_entropy's head weight, dk.Linear): they may take the direct path;
    other tensor subclasses have their own dispatch and must go through the registered op."""
    from dpar_kernels._ops import eager_route

    class Marked(torch.Tensor):
        pass

    weight = torch.nn.Parameter(torch.randn(4, 8))
    with torch.no_grad():
        assert eager_route("cpu", (torch.randn(3), weight, None)) == "direct"
        assert eager_route("cpu", (torch.randn(3).as_subclass(Marked),)) is None
    assert eager_route("cpu", (weight,)) == "autograd"  # gradient needed: the eager autograd path
