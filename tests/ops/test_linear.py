"""dk.linear / dk.Linear (the decode-shape CPU matmul) against a float64 reference and torch.nn.functional.linear."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, requires_extension
from test_gather_scatter import poisoned_outputs

import dpar_kernels as dk

pytestmark = requires_extension


def reference(x, weight, bias=None):
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def kernel_ran(fn) -> bool:
    """True when fn() called the C++ op dpar_C::linear."""
    with torch.profiler.profile() as prof:
        fn()
    return any(e.key == "dpar_C::linear" for e in prof.key_averages())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 64])
@pytest.mark.parametrize("outputs", [1, 3, 4, 5, 7, 16, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(rows, outputs, with_bias):
    depth = 48
    x, weight = torch.randn(rows, depth), torch.randn(outputs, depth)
    bias = torch.randn(outputs) if with_bias else None
    with torch.no_grad(), poisoned_outputs():
        out = dk.linear(x, weight, bias)
        direct = torch.ops.dpar_C.linear(x, weight, bias)
    assert out.shape == (rows, outputs) and out.dtype == torch.float32
    assert_close(out, reference(x, weight, bias), torch.float32)
    torch.testing.assert_close(direct, out, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [16, 256, 768, 17, 1])
def test_depths_in_and_outside_the_kernel(depth):
    """K a multiple of 16 runs the kernel; other K fall back to at::linear; both match the reference."""
    x, weight = torch.randn(16, depth), torch.randn(40, depth)
    with torch.no_grad(), poisoned_outputs():
        out = dk.linear(x, weight)
    assert_close(out, reference(x, weight), torch.float32)


def test_decode_shape_uses_the_kernel():
    x, weight = torch.randn(16, 256), torch.randn(768, 256)
    with torch.no_grad():
        assert kernel_ran(lambda: dk.linear(x, weight))
        assert not kernel_ran(lambda: dk.linear(x, weight, backend="torch"))
    assert not kernel_ran(lambda: dk.linear(x.requires_grad_(), weight))  # gradient needed: F.linear


def test_leading_dims_and_strided_inputs():
    base = torch.randn(2, 3, 80)
    x = base[..., 8:72]  # row stride 80 > K = 64
    weight = torch.randn(50, 70)[:, 3:67]  # row stride 70
    bias = torch.randn(100)[::2]  # stride 2: at::linear takes it
    with torch.no_grad(), poisoned_outputs():
        out = dk.linear(x, weight, bias)
        out_no_bias = dk.linear(x, weight)
        transposed = dk.linear(torch.randn(64, 6).T, weight)  # last dim not contiguous
    assert out.shape == (2, 3, 50)
    assert_close(out, reference(x, weight, bias), torch.float32)
    assert_close(out_no_bias, reference(x, weight), torch.float32)
    assert transposed.shape == (6, 50)


def test_nan_and_inf_follow_the_reference():
    x, weight = torch.randn(8, 32), torch.randn(12, 32)
    x[2, 5] = float("nan")
    x[4, 7] = float("inf")
    weight[3, 9] = float("-inf")
    with torch.no_grad():
        out = dk.linear(x, weight)
    assert_close(out, reference(x, weight), torch.float32)  # rel_error checks the NaN and inf patterns exactly
    assert torch.isnan(out[2]).all() and torch.isinf(out[4]).any()


@pytest.mark.parametrize("shape", [(0, 32, 8), (4, 32, 0), (4, 0, 8)])
def test_empty_shapes_match_f_linear(shape):
    rows, depth, outputs = shape
    x, weight, bias = torch.randn(rows, depth), torch.randn(outputs, depth), torch.randn(outputs)
    with torch.no_grad():
        out = dk.linear(x, weight, bias)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_are_f_linear(dtype):
    x, weight = torch.randn(4, 32, dtype=dtype), torch.randn(8, 32, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(dk.linear(x, weight), F.linear(x, weight), rtol=0, atol=0)


def test_gradients_and_autocast_take_f_linear():
    x = torch.randn(4, 32, requires_grad=True)
    layer = dk.Linear(32, 8)
    out = layer(x)
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = F.linear(x_ref, layer.weight, layer.bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grads = (x.grad, layer.weight.grad)
    layer.zero_grad()
    ref.square().sum().backward()
    torch.testing.assert_close(grads, (x_ref.grad, layer.weight.grad), rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_backend_argument():
    x, weight = torch.randn(4, 32), torch.randn(8, 32)
    with torch.no_grad():
        torch.testing.assert_close(dk.linear(x, weight, backend="torch"), F.linear(x, weight), rtol=0, atol=0)
        assert_close(dk.linear(x, weight, backend="cpu"), reference(x, weight), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        dk.linear(x, weight, backend="cuda")
    with pytest.raises(TypeError, match="x and weight"):
        dk.linear(x.numpy(), weight)


def test_default_backend_torch_is_f_linear(default_backend):
    default_backend("torch")
    x, weight = torch.randn(4, 32), torch.randn(8, 32)
    with torch.no_grad():
        assert not kernel_ran(lambda: dk.linear(x, weight))


def test_threads_split_the_outputs():
    """Enough work for several threads: at::parallel_for over output blocks (N not a multiple of the block)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, weight, bias = torch.randn(32, 256), torch.randn(4099, 256), torch.randn(4099)
        with torch.no_grad(), poisoned_outputs():
            out = dk.linear(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    assert_close(out, reference(x, weight, bias), torch.float32)


def test_module_is_a_drop_in_nn_linear():
    plain = torch.nn.Linear(32, 8)
    layer = dk.Linear(32, 8)
    layer.load_state_dict(plain.state_dict())
    assert isinstance(layer, torch.nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert_close(layer(x), reference(x, plain.weight, plain.bias), torch.float32)


def test_compiled_graph_calls_the_same_kernel():
    """Under torch.compile the kernel is the C++ op (no graph break), so compiled and eager results are identical."""
    x, weight = torch.randn(16, 256), torch.randn(96, 256)

    def step(x):
        return dk.linear(x, weight).relu()

    with torch.no_grad():
        eager = step(x)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_flop_counter_counts_the_kernel_like_f_linear():
    from torch.utils.flop_counter import FlopCounterMode

    x, weight = torch.randn(2, 8, 64), torch.randn(96, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dk.linear(x, weight)
    assert counter.get_total_flops() == 2 * 16 * 96 * 64
