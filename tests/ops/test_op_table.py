"""Every op of the op table (dpar_kernels._ops.OPS), on every backend this machine runs, through one generic path:
output and gradients against the op's pure-PyTorch reference (naive.py) in float64, the eager fast path fires and
equals the registered op, torch.compile(fullgraph=True) traces it, FlopCounterMode counts it. Per-op edge cases
live beside this file."""
import contextlib
import dataclasses
from collections.abc import Callable

import pytest
import torch
from helpers import assert_close, cpu_backends
from torch.utils.flop_counter import FlopCounterMode

import dpar_kernels as dk
from dpar_kernels._ops import OPS


@dataclasses.dataclass
class Case:
    """One call of an op: ``make(dtype)`` returns fresh positional arguments of the op table's call (float tensors
    in ``dtype``); ``grads``: indices of the arguments that get gradients (differentiable ops); ``flops``: the
    FLOPs FlopCounterMode must count (None: the op has no formula)."""
    make: Callable[[torch.dtype], tuple]
    grads: tuple[int, ...] = ()
    flops: int | None = None


def _cu(lengths):
    return dk.lengths_to_cu_seqlens(torch.tensor(lengths, dtype=torch.int32))


def _attention(dtype):
    lengths = [5, 0, 1, 9]
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 32, dtype=dtype) for h in (4, 2, 2))
    return q, k, v, _cu(lengths), _cu(lengths), 9, 9, None, True


def _attention_flops():
    pairs = sum(n * (n + 1) // 2 for n in (5, 0, 1, 9))
    return 4 * 4 * 32 * pairs


def _kvcache(dtype):
    k_cache, v_cache = torch.randn(2, 12, 2, 32, dtype=dtype), torch.randn(2, 12, 2, 32, dtype=dtype)
    q, k, v = torch.randn(2, 3, 4, 32, dtype=dtype), torch.randn(2, 3, 2, 32, dtype=dtype), \
        torch.randn(2, 3, 2, 32, dtype=dtype)
    return q, k_cache, v_cache, torch.tensor([4, 0], dtype=torch.int32), k, v, None, True


CASES = {
    "varlen_attention": Case(_attention, grads=(0, 1, 2), flops=_attention_flops()),
    "kvcache_attention": Case(_kvcache),
    "token_entropy": Case(lambda dtype: (torch.randn(7, 300, dtype=dtype) * 3, 0.8)),
    "linear_entropy": Case(lambda dtype: (torch.randn(6, 32, dtype=dtype), torch.randn(200, 32, dtype=dtype),
                                          torch.randn(200, dtype=dtype), 1.3)),
    "patch_gather": Case(lambda dtype: (torch.randn(12, 16, dtype=dtype), _cu([3, 0, 1, 8]), "max"), grads=(0,)),
    "patch_scatter": Case(lambda dtype: (torch.randn(4, 16, dtype=dtype), _cu([3, 0, 1, 8]), None), grads=(0,)),
    "linear": Case(lambda dtype: (torch.randn(5, 32, dtype=dtype), torch.randn(24, 32, dtype=dtype),
                                  torch.randn(24, dtype=dtype)), grads=(0, 1, 2), flops=2 * 5 * 24 * 32),
}


def _runs(op_name: str) -> list[tuple[str, str]]:
    return [(op_name, b) for b in OPS[op_name].backend_names if b in cpu_backends()]


ALL_RUNS = [run for name in sorted(CASES) for run in _runs(name)]


def _dtype(backend: str, op_name: str) -> torch.dtype:
    """float64 where the backend takes it; the linear kernel runs float32 only."""
    return torch.float32 if backend in ("triton", "cuda") or op_name == "linear" else torch.float64


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _clone(args, dtype=None, grads=()):
    cloned = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.detach().clone()
            if dtype is not None and a.is_floating_point():
                a = a.to(dtype)
            if i in grads:
                a.requires_grad_()
        cloned.append(a)
    return tuple(cloned)


def test_every_op_has_a_case():
    assert set(CASES) == set(OPS), "add a Case for each new op of the table"


@pytest.mark.parametrize("op_name,backend", ALL_RUNS)
def test_output_and_gradients_match_the_float64_reference(op_name, backend):
    op, case = OPS[op_name], CASES[op_name]
    dtype = _dtype(backend, op_name)
    base = case.make(torch.float64)
    grads = case.grads if op.differentiable or backend in op.native else ()
    args = _clone(base, dtype, grads)
    ref_args = _clone(base, torch.float64, grads)
    grad_enabled = bool(grads)
    with torch.set_grad_enabled(grad_enabled):
        out = _first(op(*args, backend=backend))
        ref = _first(op.reference(*op.validate(*ref_args, backend="torch").args))  # naive.py, differentiable
    assert out.dtype == (ref.dtype if dtype == torch.float64 else out.dtype)
    assert_close(out, ref, dtype, factor=10)
    for i, (a, r) in enumerate(zip(args, ref_args)):  # a mutated input (the KV cache) matches too
        if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in grads:
            assert_close(a.detach(), r.detach(), dtype)
    if grads:
        weight = torch.randn(ref.shape, dtype=torch.float64)
        (out * weight.to(out.dtype)).sum().backward()
        (ref * weight).sum().backward()
        for i in grads:
            if args[i] is not None:
                assert_close(args[i].grad, ref_args[i].grad, dtype, factor=10)


@contextlib.contextmanager
def _counting_calls(op, backend: str, monkeypatch):
    """Within the block, op.backends[backend] records each direct call in the yielded list."""
    calls, kernel = [], op.backends[backend]

    def counted(*a):
        calls.append(backend)
        return kernel(*a)

    monkeypatch.setitem(op.backends, backend, counted)
    yield calls
    monkeypatch.setitem(op.backends, backend, kernel)


@pytest.mark.parametrize("op_name,backend", ALL_RUNS)
def test_fast_path_fires_and_equals_the_registered_op(op_name, backend, monkeypatch):
    """No gradient, eager: the backend function runs directly (no dispatcher round trip), and gives exactly what
    the registered op (custom op or C++ op) gives."""
    op, case = OPS[op_name], CASES[op_name]
    args = case.make(_dtype(backend, op_name))
    with torch.no_grad():
        prepared = op.validate(*_clone(args), backend=backend)
        with _counting_calls(op, backend, monkeypatch) as calls:
            direct = op(*_clone(args), backend=backend)
        assert calls == [backend], "the eager fast path did not fire"
        if backend in op.native:
            return  # torch's own op: it is the registered path
        registered_args = _clone(prepared.args)
        if op.extension is not None and backend in ("cpu", "cuda"):
            registered = op.extension(*registered_args)
        else:
            registered = op.custom_op(*registered_args, backend)
    for a, b in zip(direct if isinstance(direct, tuple) else (direct,),
                    registered if isinstance(registered, tuple) else (registered,)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


GRAD_RUNS = [(name, b) for name, b in ALL_RUNS if OPS[name].differentiable and b not in OPS[name].native]


@pytest.mark.parametrize("op_name,backend", GRAD_RUNS)
def test_eager_autograd_path_fires_and_equals_the_registered_op(op_name, backend, monkeypatch):
    """A gradient needed, eager: the backend runs directly inside the eager autograd.Function, and the output and
    the gradients are exactly the custom op's (its registered autograd)."""
    op, case = OPS[op_name], CASES[op_name]
    base = case.make(_dtype(backend, op_name))
    def output_and_grads(run):
        args = _clone(base, grads=case.grads)
        out = run(args)
        weight = torch.randn(_first(out).shape, generator=torch.Generator().manual_seed(0)).to(_first(out).dtype)
        (_first(out) * weight).sum().backward()
        return _first(out), [args[i].grad for i in case.grads]

    with _counting_calls(op, backend, monkeypatch) as calls:
        eager = output_and_grads(lambda args: op(*args, backend=backend))
    assert calls == [backend], "the eager autograd path did not run the backend directly"
    registered = output_and_grads(lambda args: op.custom_op(*op.validate(*args, backend=backend).args, backend))
    torch.testing.assert_close(eager[0], registered[0], rtol=0, atol=0, equal_nan=True)
    for a, b in zip(eager[1], registered[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op_name,backend", ALL_RUNS)
def test_compiles_fullgraph(op_name, backend):
    op, case = OPS[op_name], CASES[op_name]
    args = case.make(_dtype(backend, op_name))
    with torch.no_grad():
        eager = _first(op(*_clone(args), backend=backend))
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: op(*a, backend=backend), fullgraph=True, backend="aot_eager")
        traced = _first(compiled(*_clone(args)))
    torch.testing.assert_close(traced, eager, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op_name,backend", ALL_RUNS)
def test_flop_counter_counts(op_name, backend):
    op, case = OPS[op_name], CASES[op_name]
    args = case.make(_dtype(backend, op_name))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        op(*args, backend=backend)
    if case.flops is not None:
        assert counter.get_total_flops() == case.flops
    else:
        assert counter.get_total_flops() == 0
