"""backend=None on CPU tensors follows the measured choice (dpar_kernels/cpu_choice.json): the C++ kernel only where
it was measured faster than the torch backend for this ISA path and shape class."""
import json
import os

import pytest
import torch
from helpers import requires_extension

import dpar_kernels as dk
from dpar_kernels import _cpu_choice, _dispatch
from dpar_kernels._ops import OPS

CPU = torch.device("cpu")


def _shipped() -> dict:
    with open(os.path.join(os.path.dirname(os.path.abspath(_cpu_choice.__file__)), "cpu_choice.json")) as f:
        return json.load(f)


def test_the_shipped_table_is_well_formed():
    choices = _shipped()["choices"]
    assert set(choices) <= {"avx512", "avx2", "default"}
    for isa, entries in choices.items():
        for key, entry in entries.items():
            op, shape_class = key.split("/")
            assert op in OPS and shape_class, key
            assert entry["backend"] in ("cpu", "torch"), (isa, key)
            assert entry["backend"] == "torch" or entry["ratio"] >= 1.0, (isa, key, "cpu chosen although slower")
            assert {"cpu", "command", "ratio"} <= set(entry), (isa, key)


@requires_extension
def test_resolution_follows_the_table(cpu_choice):
    isa = _cpu_choice.cpu_isa()
    cpu_choice({isa: {"token_entropy/small": {"backend": "cpu"}, "token_entropy/large": {"backend": "torch"}}})
    resolve = lambda shape_class: _dispatch.resolve_backend("token_entropy", None, CPU, ("torch", "cpu"),  # noqa
                                                            shape_class=shape_class)
    assert resolve("small") == "cpu"
    assert resolve("large") == "torch"
    assert resolve("unmeasured") == "torch"  # no entry: the kernel has not earned its place
    cpu_choice({"some-other-isa": {"*": {"backend": "cpu"}}})
    assert resolve("small") == "torch"  # another ISA path's measurement does not apply here
    cpu_choice({isa: {"token_entropy/*": {"backend": "cpu"}}})
    assert resolve("large") == "cpu"


@requires_extension
def test_a_forced_cpu_backend_ignores_the_table(cpu_choice):
    cpu_choice({})
    logits = torch.randn(4, 50)
    assert _dispatch.resolve_backend("token_entropy", "cpu", CPU, ("torch", "cpu"), shape_class="small") == "cpu"
    torch.testing.assert_close(dk.token_entropy(logits, backend="cpu"), dk.token_entropy(logits, backend="torch"))


@pytest.mark.parametrize("call,expected", [
    (lambda: OPS["token_entropy"].validate(torch.randn(16, 512), 1.0, backend=None), "small"),
    (lambda: OPS["token_entropy"].validate(torch.randn(64, 4096), 1.0, backend=None), "large"),
    (lambda: OPS["linear"].validate(torch.randn(1, 8), torch.randn(4, 8), None, backend=None), "1-row"),
    (lambda: OPS["linear"].validate(torch.randn(3, 8), torch.randn(4, 8), None, backend=None), "rows"),
    (lambda: OPS["patch_gather"].validate(torch.randn(4, 8), dk.lengths_to_cu_seqlens(
        torch.tensor([4], dtype=torch.int32)), "max", backend=None), "small"),
    (lambda: OPS["patch_gather"].validate(torch.randn(4, 8, requires_grad=True), dk.lengths_to_cu_seqlens(
        torch.tensor([4], dtype=torch.int32)), "max", backend=None), "train"),
])
def test_shape_classes(call, expected):
    assert call().shape_class == expected


def test_attention_shape_classes():
    def shape_class(lengths, grad=False):
        cu = dk.lengths_to_cu_seqlens(torch.tensor(lengths, dtype=torch.int32))
        q = torch.randn(sum(lengths), 2, 32, requires_grad=grad)
        return OPS["varlen_attention"].validate(q, q, q, cu, cu, max(lengths), max(lengths), None, True,
                                                backend=None).shape_class

    assert shape_class([1, 3, 16]) == "short"
    assert shape_class([1, 17]) == "long"
    assert shape_class([1, 17], grad=True) == "train-long"
