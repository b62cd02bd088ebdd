"""token_entropy / linear_entropy: every CPU-runnable backend against the float64 reference, plus input errors."""
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, assert_close, cpu_backends

import dpar_kernels as dk
from dpar_kernels import _dispatch, _extension
from dpar_kernels.entropy import naive

BACKENDS = cpu_backends()  # torch, cpu (extension built), triton (interpreter)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp(-inf) notes in the interpreter


def dtypes_for(backend):
    """The Triton interpreter mishandles bf16, so bf16 is checked on torch/cpu only."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if backend != "triton" else [])


def reference(logits, temperature=1.0):
    """float64 entropy of the values actually stored in logits, shape [...]."""
    flat = logits.double().reshape(-1, logits.shape[-1])
    return naive.token_entropy(flat, temperature).reshape(logits.shape[:-1])


def check_token_entropy(logits, backend, temperature=1.0, factor=1.0):
    out = dk.token_entropy(logits, temperature=temperature, backend=backend)
    assert out.dtype == torch.float32 and out.shape == logits.shape[:-1]
    assert_close(out, reference(logits, temperature), logits.dtype, factor)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 50), (4, 1), (3, 7), (3, 16384), (2, 16385)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_entropy_matches_reference(backend, shape, temperature):
    for dtype in dtypes_for(backend):
        logits = (torch.randn(shape) * 2.5).to(dtype)
        check_token_entropy(logits, backend, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_entropy_special_rows(backend):
    v = 1000
    masked = torch.randn(6, v)
    masked[torch.rand(6, v) < 0.7] = float("-inf")
    masked[:, 0] = 0.5  # every row keeps a finite entry
    masked[5, 1:] = float("-inf")  # a single finite entry: entropy 0
    for dtype in dtypes_for(backend):
        check_token_entropy(masked.to(dtype), backend, temperature=0.8)
    uniform = torch.full((3, v), 1.7)
    out = dk.token_entropy(uniform, backend=backend)
    torch.testing.assert_close(out, torch.full((3,), math.log(v)), rtol=1e-5, atol=0)
    one_hot = torch.full((2, v), -40.0)
    one_hot[:, 17] = 40.0
    out = check_token_entropy(one_hot, backend)
    assert (out.abs() < 1e-20).all()
    all_masked = torch.full((2, v), float("-inf"))
    all_masked[1, 3] = 1.0
    out = dk.token_entropy(all_masked, backend=backend)
    assert torch.isnan(out[0]) and out[1] == 0
    assert dk.token_entropy(torch.randn(2, 0, 9), backend=backend).shape == (2, 0)  # no rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_entropy_huge_logits(backend):
    spread = torch.randn(4, 3000) * 3
    for offset in (1e4, -1e4):
        check_token_entropy(spread + offset, backend)  # large magnitude, entropy ~ 7
    near_one_hot = torch.randn(4, 3000) * 1e4  # gaps of thousands: entropy ~ 0, must not overflow
    out = check_token_entropy(near_one_hot, backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_entropy_non_contiguous(backend):
    wide = torch.randn(9, 3000)
    check_token_entropy(wide[:, 3:2003], backend)  # row stride 3000, rows start unaligned
    check_token_entropy(wide[::2, ::3], backend)  # column stride 3 (copied by the wrapper)
    check_token_entropy(wide.T[:50], backend)  # transposed: column stride 3000
    check_token_entropy(wide.half()[1:, 5:1005], backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_token_entropy_giant_row_and_float64(backend):
    giant = torch.randn(1, 1 << 20) * 4
    # torch's fp32 softmax-then-sum over 2^20 terms drifts by ~1e-4; the fused kernels stay within 1e-5.
    check_token_entropy(giant, backend, factor=20.0 if backend == "torch" else 1.0)
    double = torch.randn(5, 333, dtype=torch.float64)
    out = dk.token_entropy(double, temperature=0.7, backend=backend)
    assert_close(out, reference(double, 0.7), torch.float32)


@pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="the C++ extension is not built")
def test_extension_token_entropy_is_default_and_float64_exact(default_backend):
    default_backend(None)
    logits = torch.randn(6, 257)
    assert _dispatch.resolve_backend("token_entropy", None, logits.device, ("torch", "cpu")) == "cpu"
    assert torch.equal(dk.token_entropy(logits), dk.token_entropy(logits, backend="cpu"))
    double = torch.randn(6, 4097, dtype=torch.float64) * 3
    out = torch.ops.dpar_C.token_entropy(double, 0.9)
    assert out.dtype == torch.float64
    assert_close(out, naive.token_entropy(double, 0.9), torch.float64)


@pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="the C++ extension is not built")
def test_extension_ops_check_their_inputs():
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.dpar_C.token_entropy(torch.randn(5), 1.0)
    with pytest.raises(RuntimeError, match="stride"):
        torch.ops.dpar_C.token_entropy(torch.randn(5, 4).T, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.dpar_C.token_entropy(torch.ones(2, 3, dtype=torch.int32), 1.0)
    state = [torch.zeros(3), torch.zeros(3), torch.zeros(2)]
    with pytest.raises(RuntimeError, match="vectors"):
        torch.ops.dpar_C.entropy_state_update(torch.randn(3, 8), *state, 1.0)


def test_forcing_unavailable_backends_raises():
    logits = torch.randn(2, 8)
    with pytest.raises(dk.BackendUnavailableError, match="cuda"):
        dk.token_entropy(logits, backend="cuda")
    with pytest.raises(dk.BackendUnavailableError, match="cuda"):
        dk.linear_entropy(torch.randn(2, 4), torch.randn(8, 4), backend="cuda")
    with pytest.raises(TypeError, match="float64"):  # the Triton/CUDA kernels take no float64 (as every op)
        dk.token_entropy(logits.double(), backend="triton")


def test_token_entropy_bad_inputs():
    with pytest.raises(TypeError, match="logits"):
        dk.token_entropy(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        dk.token_entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match="logits"):
        dk.token_entropy(torch.randn(3, 0))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            dk.token_entropy(torch.randn(2, 3), temperature=bad)
    with pytest.raises(ValueError, match="requires grad"):
        dk.token_entropy(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match="backend"):
        dk.token_entropy(torch.randn(2, 3), backend="numpy")


def test_token_entropy_under_torch_compile():
    def entropy_of_scaled(x):
        return dk.token_entropy(x * 2.0, temperature=0.5) + 1.0

    compiled = torch.compile(entropy_of_scaled, fullgraph=True)
    x = torch.randn(4, 3, 100)
    torch.testing.assert_close(compiled(x), entropy_of_scaled(x))


def linear_inputs(n, d, v, dtype, masked_bias):
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) / math.sqrt(d) * 3).to(dtype)
    bias = None
    if masked_bias is not None:
        bias = torch.randn(v)
        if masked_bias:
            bias[torch.rand(v) < 0.3] = float("-inf")
        bias = bias.to(dtype)
    return hidden, weight, bias


def linear_reference(hidden, weight, bias, temperature):
    return naive.linear_entropy_reference(hidden.double(), weight.double(),
                                          None if bias is None else bias.double(), temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_kind", [None, False, True], ids=["no-bias", "bias", "masked-bias"])
def test_linear_entropy_matches_reference(backend, bias_kind):
    for dtype in dtypes_for(backend):
        hidden, weight, bias = linear_inputs(70, 40, 300, dtype, bias_kind)
        out = dk.linear_entropy(hidden, weight, bias, temperature=0.8, backend=backend)
        assert out.dtype == torch.float32 and out.shape == (70,)
        assert_close(out, linear_reference(hidden, weight, bias, 0.8), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_entropy_edge_shapes(backend):
    one_row = linear_inputs(1, 16, 1, torch.float32, False)  # one row, one-word vocabulary: entropy 0
    assert dk.linear_entropy(*one_row, backend=backend).item() == 0
    hidden, weight, bias = linear_inputs(33, 24, 130, torch.float32, True)
    hidden_strided = torch.randn(33, 50)[:, 3:27].copy_(hidden)  # row stride 50
    weight_transposed = weight.T.contiguous().T  # column stride V: copied by the wrapper
    out = dk.linear_entropy(hidden_strided, weight_transposed, bias, backend=backend)
    assert_close(out, linear_reference(hidden, weight, bias, 1.0), torch.float32)
    empty = dk.linear_entropy(torch.randn(0, 24), weight, backend=backend)
    assert empty.shape == (0,)


@pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_linear_entropy_ragged_chunks(dtype):
    from dpar_kernels.entropy import cpu_linear

    hidden, weight, bias = linear_inputs(37, 24, 250, dtype, True)
    out = cpu_linear.linear_entropy(hidden, weight, bias, 0.7, row_chunk=16, vocab_chunk=100)
    assert_close(out, linear_reference(hidden, weight, bias, 0.7), dtype)


@pytest.mark.skipif(not _extension.HAS_CPU_OPS, reason="the C++ extension is not built")
@pytest.mark.parametrize("rows", [5, 16, 32])
@pytest.mark.parametrize("depth", [64, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_entropy_decode_rows(rows, depth, dtype):
    """At most LINEAR_MAX_ROWS rows multiply with dpar_C.linear (its kernel for depth 64, at::linear for 24)."""
    from dpar_kernels.entropy import cpu_linear

    hidden, weight, bias = linear_inputs(rows, depth, 250, dtype, True)
    out = cpu_linear.linear_entropy(hidden, weight, bias, 0.7, vocab_chunk=100)
    assert_close(out, linear_reference(hidden, weight, bias, 0.7), dtype)
    assert_close(dk.linear_entropy(hidden, weight, backend="cpu"), linear_reference(hidden, weight, None, 1.0), dtype)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton interpreter unavailable")
@pytest.mark.parametrize("splits", [2, 5])
def test_triton_linear_entropy_vocab_splits(splits):
    from dpar_kernels.entropy import triton_kernels

    hidden, weight, bias = linear_inputs(70, 40, 300, torch.float32, True)
    bias[:128] = float("-inf")  # a whole vocabulary slice masked for some splits
    out = triton_kernels.linear_entropy(hidden, weight, bias, 0.9, vocab_splits=splits)
    assert_close(out, linear_reference(hidden, weight, bias, 0.9), torch.float32)


def test_linear_entropy_bad_inputs():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="hidden"):
        dk.linear_entropy(hidden.int(), weight)
    with pytest.raises(ValueError, match="disagree on D"):
        dk.linear_entropy(hidden, torch.randn(10, 9))
    with pytest.raises(ValueError, match="bias"):
        dk.linear_entropy(hidden, weight, torch.randn(9))
    with pytest.raises(ValueError, match="meta"):
        dk.linear_entropy(hidden, weight.to("meta"))
    with pytest.raises(ValueError, match="temperature"):
        dk.linear_entropy(hidden, weight, temperature=0.0)
    with pytest.raises(ValueError, match="requires grad"):
        dk.linear_entropy(hidden, weight.requires_grad_())
    with pytest.raises(ValueError, match="backend"):
        dk.linear_entropy(hidden, torch.randn(10, 8), backend="gpu")


GPU_BACKENDS = dk.available_backends(torch.device("cuda")) if torch.cuda.is_available() else []


@pytest.mark.skipif(not GPU_BACKENDS, reason="no CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype):
    for v in (1, 7, 1000, 2049, 16385):  # warp-per-row and block-per-row CUDA paths, ragged tails
        wide = (torch.randn(37, v + 5, device="cuda") * 3).to(dtype)
        wide[3, : v // 2] = float("-inf")
        wide[4, :] = float("-inf")
        check_token_entropy(wide[:, 3:3 + v], backend, temperature=0.7)  # unaligned row starts
        check_token_entropy(wide[:, :v] + 1e4 if dtype == torch.float32 else wide[:, :v], backend)
    hidden, weight, bias = (t if t is None else t.cuda() for t in linear_inputs(300, 96, 5000, dtype, True))
    out = dk.linear_entropy(hidden, weight, bias, temperature=0.9, backend=backend)
    assert_close(out, linear_reference(hidden, weight, bias, 0.9), dtype)


_TRITON_GPU_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dpar_kernels.entropy import triton_kernels as tk

arch = int(sys.argv[1])
for ptr in ("*fp32", "*fp16", "*bf16"):
    token = ASTSource(tk._token_entropy_kernel, constexprs={"BLOCK_V": tk.TOKEN_BLOCK_V}, signature={
        "x_ptr": ptr, "out_ptr": "*fp32", "V": "i32", "row_stride": "i64", "inv_t": "fp32", "BLOCK_V": "constexpr"})
    triton.compile(token, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
    names = ("h_ptr", "w_ptr", "b_ptr", "m_ptr", "s_ptr", "w_out_ptr", "N", "V", "D", "stride_hn", "stride_wv",
             "vocab_per_split", "inv_t")
    types = (ptr, ptr, ptr, "*fp32", "*fp32", "*fp32") + ("i32",) * 6 + ("fp32",)
    constexprs = {"HAS_BIAS": True, "PRECISION": "ieee" if ptr == "*fp32" else "tf32",
                  "BLOCK_N": tk.LINEAR_BLOCK_N, "BLOCK_V": tk.LINEAR_BLOCK_V, "BLOCK_D": tk.LINEAR_BLOCK_D}
    signature = dict(zip(names, types)) | {name: "constexpr" for name in constexprs}
    linear = ASTSource(tk._linear_entropy_kernel, signature=signature, constexprs=constexprs)
    triton.compile(linear, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})
print("compiled")
"""


@pytest.mark.slow  # compiles for two GPU archs (a minute)
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpus(arch, tmp_path):
    """Compiles the Triton kernels to sm_80/sm_90 cubins (no GPU needed), outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    root = ROOT
    result = subprocess.run([sys.executable, "-c", _TRITON_GPU_COMPILE, str(arch)], capture_output=True, text=True,
                            env=env, cwd=root, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
