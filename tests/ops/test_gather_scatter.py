"""patch_gather / patch_scatter on every CPU backend against the float64 torch reference, gradients, edge cases."""
import contextlib

import pytest
import torch
from helpers import assert_close, cpu_backends, cu_from_lengths, requires_extension

import dpar_kernels as dk
from dpar_kernels.gather_scatter import naive

BACKENDS = cpu_backends()
REDUCTIONS = ("max", "sum", "mean")
# the Triton interpreter mishandles bf16, so Triton is checked in fp32/fp16 only
DTYPES = {"torch": [torch.float32, torch.float16, torch.bfloat16, torch.float64],
          "cpu": [torch.float32, torch.float16, torch.bfloat16, torch.float64],
          "triton": [torch.float32, torch.float16]}
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in DTYPES[b]]
# (patch lengths, D): empty, single-token and long patches; a patch at a row start; D not a multiple of any block
CASES = {
    "ragged_d1": ([0, 1, 3, 0, 2, 5, 1], 1),
    "ragged_d7": ([1, 0, 4, 1, 1, 0, 3, 2], 7),
    "ragged_d64": ([2, 3, 0, 1, 4, 1], 64),
    "long_patch": ([1, 1100, 0, 2], 7),
    "wide_d4096": ([2, 0, 3], 4096),
}


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty (Python or C++) is filled with NaN (ints: their max), so unwritten outputs show."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def packed_tokens(total: int, cols: int, dtype, column_slice: bool) -> torch.Tensor:
    """Random [total, cols] tokens; with column_slice, a column slice of a wider tensor (row stride > cols)."""
    if column_slice:
        return torch.randn(total, cols + 5).to(dtype)[:, 3:3 + cols]
    return torch.randn(total, cols).to(dtype)


def reference_gather(x, cu, reduce, grad_out):
    """float64 (out, grad_x) of the torch reference."""
    x64 = x.detach().double().requires_grad_(True)
    out = dk.patch_gather(x64, cu, reduce=reduce, backend="torch")
    out.backward(grad_out.double())
    return out.detach(), x64.grad


def _cheap_enough(backend, dtype, case, column_slice=False) -> bool:
    """The interpreted Triton loop over a 1100-token patch is slow: run that case once (fp32, contiguous)."""
    return backend != "triton" or case != "long_patch" or (dtype == torch.float32 and not column_slice)


@pytest.mark.parametrize("backend,dtype,case,column_slice", [
    pytest.param(b, d, c, s, id=f"{b}-{str(d)[6:]}-{c}-{'column_slice' if s else 'contiguous'}")
    for b, d in BACKEND_DTYPES for c in CASES for s in (False, True) if _cheap_enough(b, d, c, s)])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gather_forward_and_backward(backend, dtype, reduce, column_slice, case):
    lengths, cols = CASES[case]
    cu = cu_from_lengths(lengths)
    x = packed_tokens(int(cu[-1]), cols, dtype, column_slice).requires_grad_(True)
    grad_out = torch.randn(len(lengths), cols).to(dtype)
    with poisoned_outputs():
        out = dk.patch_gather(x, cu, reduce=reduce, backend=backend)
        out.backward(grad_out)
    expected, expected_grad = reference_gather(x, cu, reduce, grad_out)
    assert out.dtype == dtype and out.shape == (len(lengths), cols)
    assert_close(out, expected, dtype)
    assert_close(x.grad, expected_grad, dtype)
    empty = torch.tensor(lengths) == 0
    assert bool((out[empty] == 0).all())


@pytest.mark.parametrize("backend,dtype,case", [
    pytest.param(b, d, c, id=f"{b}-{str(d)[6:]}-{c}") for b, d in BACKEND_DTYPES for c in CASES
    if _cheap_enough(b, d, c)])
def test_scatter_forward_and_backward(backend, dtype, case):
    lengths, cols = CASES[case]
    cu = cu_from_lengths(lengths)
    total = int(cu[-1])
    y = torch.randn(len(lengths), cols + 2).to(dtype)[:, 1:1 + cols].requires_grad_(True)  # row stride > cols
    grad_out = torch.randn(total, cols).to(dtype)
    with poisoned_outputs():
        out = dk.patch_scatter(y, cu, backend=backend)
        out.backward(grad_out)
    y64 = y.detach().double().requires_grad_(True)
    expected = dk.patch_scatter(y64, cu, backend="torch")
    expected.backward(grad_out.double())
    assert out.dtype == dtype and out.shape == (total, cols)
    assert torch.equal(out.double(), expected.detach())  # a copy is exact
    assert_close(y.grad, y64.grad, dtype)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpu")])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck_float64(backend, reduce):
    cu = cu_from_lengths([2, 0, 1, 4, 3])
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dk.patch_gather(t, cu, reduce=reduce, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: dk.patch_scatter(t, cu, backend=backend), (y,))
    assert torch.autograd.gradgradcheck(lambda t: dk.patch_scatter(t, cu, backend=backend), (y,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_ties_go_to_the_first_token(backend):
    cu = cu_from_lengths([3, 1, 0, 4])
    x = torch.tensor([[1.0, 2.0], [1.0, 5.0], [0.0, 5.0],  # patch 0: column 0 tie at tokens 0, 1; column 1 at 1, 2
                      [-3.0, -3.0],  # patch 1: one token
                      [float("-inf")] * 2, [float("-inf")] * 2, [7.0, float("-inf")], [7.0, float("-inf")]],
                     requires_grad=True)
    out = dk.patch_gather(x, cu, reduce="max", backend=backend)
    out.sum().backward()
    assert out.tolist() == [[1.0, 5.0], [-3.0, -3.0], [0.0, 0.0], [7.0, float("-inf")]]
    expected_grad = torch.zeros(8, 2)
    expected_grad[0, 0] = expected_grad[1, 1] = 1  # first of the tied tokens
    expected_grad[3] = 1
    expected_grad[6, 0] = expected_grad[4, 1] = 1  # all -inf column: the first token
    assert torch.equal(x.grad, expected_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_without_grad_skips_the_argmax_and_matches(backend):
    cu = cu_from_lengths([3, 0, 1, 5, 2])
    x = torch.randn(11, 6)
    x[1, 2] = x[0, 2]  # a tie
    x[8, 4] = float("nan")
    grad_out = torch.randn(5, 6)
    with poisoned_outputs():
        with torch.no_grad():
            no_grad_out = dk.patch_gather(x.clone().requires_grad_(True), cu, reduce="max", backend=backend)
        plain_out = dk.patch_gather(x, cu, reduce="max", backend=backend)  # x does not require grad
        leaf = x.clone().requires_grad_(True)
        with_grad = dk.patch_gather(leaf, cu, reduce="max", backend=backend)
        with_grad.backward(grad_out)
    torch.testing.assert_close(no_grad_out, with_grad.detach(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(plain_out, with_grad.detach(), rtol=0, atol=0, equal_nan=True)
    _, expected_grad = reference_gather(leaf, cu, "max", grad_out)
    assert torch.equal(leaf.grad.double(), expected_grad)
    for with_argmax in (False, True):
        out, argmax = torch.ops.dpar.patch_gather(x, cu, "max", with_argmax, backend)
        assert argmax.shape == ((5, 6) if with_argmax else (0,))
        torch.testing.assert_close(out, no_grad_out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_then_gather_mean_returns_the_input(backend):
    lengths = [3, 1, 0, 2, 1200 if backend != "triton" else 40]
    cu = cu_from_lengths(lengths)
    y = torch.randn(len(lengths), 9)
    back = dk.patch_gather(dk.patch_scatter(y, cu, backend=backend), cu, reduce="mean", backend=backend)
    nonempty = torch.tensor(lengths) > 0
    assert_close(back[nonempty], y[nonempty], torch.float32, factor=20)  # fp32 sum of up to 1200 copies
    assert bool((back[~nonempty] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_sum_equals_segment_sums_from_cumsum(backend):
    lengths = [4, 0, 1, 7, 2, 0, 5]
    cu = cu_from_lengths(lengths)
    x = torch.randn(int(cu[-1]), 13)
    prefix = torch.cat([torch.zeros(1, 13, dtype=torch.float64), x.double().cumsum(0)])
    expected = prefix[cu[1:].long()] - prefix[cu[:-1].long()]
    assert_close(dk.patch_gather(x, cu, reduce="sum", backend=backend), expected, torch.float32)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@requires_extension
def test_many_patches_cpu(reduce):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 5, (40_000,), generator=generator, dtype=torch.int32)  # ~1e5 tokens
    cu = dk.lengths_to_cu_seqlens(lengths)
    x = torch.randn(int(cu[-1]), 24, generator=generator, requires_grad=True)
    grad_out = torch.randn(lengths.numel(), 24, generator=generator)
    with poisoned_outputs():
        out = dk.patch_gather(x, cu, reduce=reduce, backend="cpu")
        out.backward(grad_out)
        scattered = dk.patch_scatter(out.detach(), cu, backend="cpu")
    expected, expected_grad = reference_gather(x, cu, reduce, grad_out)
    assert_close(out, expected, torch.float32)
    assert_close(x.grad, expected_grad, torch.float32)
    assert torch.equal(scattered, naive.patch_scatter(out.detach(), cu, x.shape[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens_and_no_patches(backend):
    cu = torch.zeros(3, dtype=torch.int32)  # three offsets, two empty patches, no tokens
    out = dk.patch_gather(torch.empty(0, 5), cu, reduce="max", backend=backend)
    assert out.shape == (2, 5) and bool((out == 0).all())
    assert dk.patch_scatter(torch.randn(2, 5), cu, backend=backend).shape == (0, 5)
    assert dk.patch_gather(torch.empty(0, 5), cu[:1], reduce="sum", backend=backend).shape == (0, 5)


def _gather_call(x=None, cu=None, reduce="max"):
    x = torch.randn(6, 4) if x is None else x
    cu = cu_from_lengths([2, 4]) if cu is None else cu
    return lambda: dk.patch_gather(x, cu, reduce=reduce)


@pytest.mark.parametrize("call,error,name", [
    (_gather_call(x=torch.ones(6, 4, dtype=torch.int32)), TypeError, "x"),
    (_gather_call(x=torch.randn(6)), ValueError, "x"),
    (_gather_call(cu=torch.tensor([0, 2, 6])), TypeError, "cu_tokens"),
    (_gather_call(cu=torch.tensor([0, 4, 2, 6], dtype=torch.int32)), ValueError, "cu_tokens"),
    (_gather_call(cu=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, "cu_tokens"),
    (_gather_call(cu=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, "cu_tokens"),
    (_gather_call(cu=torch.tensor([0, 2, 6], dtype=torch.int32, device="meta")), ValueError, "cu_tokens"),
    (_gather_call(reduce="min"), ValueError, "reduce"),
    (lambda: dk.patch_scatter(torch.ones(2, 4, dtype=torch.int64), cu_from_lengths([2, 4])), TypeError, "y"),
    (lambda: dk.patch_scatter(torch.randn(3, 4), cu_from_lengths([2, 4])), ValueError, "cu_tokens"),
    (lambda: dk.patch_scatter(torch.randn(2, 4), cu_from_lengths([2, 4]), total_tokens=5), ValueError, "cu_tokens"),
])
def test_bad_inputs_name_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


@requires_extension
@pytest.mark.parametrize("call,error,name", [
    (lambda: torch.ops.dpar_C.patch_gather(torch.randn(6, 4), torch.tensor([0, 7], dtype=torch.int32), "sum",
                                           False),
     ValueError, "cu_tokens"),
    (lambda: torch.ops.dpar_C.patch_gather(torch.randn(6, 4), torch.tensor([0, 6], dtype=torch.int32), "min",
                                           True),
     ValueError, "reduce"),
    (lambda: torch.ops.dpar_C.patch_scatter(torch.randn(2, 4), torch.tensor([0, 3, 2], dtype=torch.int32), 2),
     ValueError, "cu_tokens"),
    (lambda: torch.ops.dpar_C.patch_gather_backward(torch.randn(1, 4), torch.tensor([0, 6], dtype=torch.int32),
                                                    torch.full((1, 4), 9, dtype=torch.int32), 6, "max"),
     ValueError, "argmax"),
])
def test_extension_ops_guard_their_inputs(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    cu = cu_from_lengths([2, 0, 3, 1])

    def gather_then_scatter(x, cu_tokens):
        patches = dk.patch_gather(x, cu_tokens, reduce="max", backend=backend)
        return dk.patch_scatter(patches * 2, cu_tokens, total_tokens=6, backend=backend)

    compiled = torch.compile(gather_then_scatter, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 8, requires_grad=True)
    out = compiled(x, cu)
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    expected = gather_then_scatter(x_ref, cu)
    expected.sum().backward()
    assert torch.equal(out, expected)
    assert torch.equal(x.grad, x_ref.grad)
