"""Every op on the cuda and triton backends, on CUDA tensors, against the float64 torch reference (run on the CPU).

Marked ``gpu`` (``pytest -m gpu``; scripts/gpu_check.sh runs them) and skipped where CUDA is absent, so
``pytest -m gpu --collect-only -q`` lists them on any machine. Ids name the op's backend and case, e.g.
``test_attention_gpu[triton-bf16-d128-causal]``. Every kernel output is allocated with torch.empty while
``poisoned()`` is active, so an element a kernel fails to write is NaN and fails the comparison. Inputs are built on
the CPU (reusing the CPU tests' builders), then copied to the GPU with their strides kept (``on_device``).

DPAR_GPU_TESTS_DEVICE=cpu (``scripts/gpu_check.sh --dry-run``) runs the same tests on CPU tensors with tiny sizes:
the triton backend under the interpreter (fp32/fp16), the cuda backend and bf16 skipped. That only checks the
tests themselves; nothing here is verified on a GPU until it has run on one.

Adding an op: one ``@pytest.mark.parametrize("backend,dtype", backend_dtypes(), ...)`` test that builds inputs,
calls the op with ``backend=backend`` inside ``poisoned()`` and compares with its reference.
"""
import contextlib
import itertools

import pytest
import torch
from helpers import GPU_BACKENDS, GPU_DEVICE, GPU_DRY_RUN, GPU_MARKS, assert_close, cu_from_lengths
from test_attention_triton import _inputs as attention_inputs
from test_attention_triton import _reference as attention_reference
from test_entropy import reference as entropy_reference
from test_gather_scatter import CASES as PATCH_CASES
from test_gather_scatter import REDUCTIONS, packed_tokens, reference_gather
from test_kvcache import reference as kvcache_reference

import dpar_kernels as dk
from dpar_kernels import _dispatch
from dpar_kernels.attention import naive as attention_naive
from dpar_kernels.constants import ATTENTION_HEAD_DIMS as HEAD_DIMS
from dpar_kernels.entropy import naive as entropy_naive

DEVICE, DRY_RUN = GPU_DEVICE, GPU_DRY_RUN
pytestmark = GPU_MARKS
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cases(**axes) -> list:
    """pytest.params over the product of ``axes`` (name -> values or {id: value}), ids joined by '-'."""
    named = [list(values.items()) if isinstance(values, dict) else [(str(v), v) for v in values]
             for values in axes.values()]
    return [pytest.param(*(value for _, value in combo), id="-".join(label for label, _ in combo))
            for combo in itertools.product(*named)]


def backend_dtypes(**more) -> list:
    return cases(backend=GPU_BACKENDS, dtype=DTYPES, **more)


def sized(gpu, dry_run):
    """A test size: ``gpu`` on the GPU, ``dry_run`` in the CPU dry run (the Triton interpreter is slow)."""
    return dry_run if DRY_RUN else gpu


@pytest.fixture(autouse=True)
def _backend_available(request):
    """A GPU backend that cannot run here is a failure, not a skip: the GPU check must run every kernel."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    backend = params.get("backend")
    if DRY_RUN and (backend == "cuda" or params.get("dtype") == torch.bfloat16):
        pytest.skip("dry run on CPU: the cuda backend needs a GPU, the Triton interpreter mishandles bf16")
    if backend is not None:
        reason = _dispatch._why_unavailable(backend, DEVICE)
        if reason is not None:
            pytest.fail(f"backend {backend!r} cannot run on {DEVICE.type} tensors here: {reason}")


@contextlib.contextmanager
def poisoned():
    """Every torch.empty (Python, C++ or Triton wrapper) is NaN-filled (ints: their max) while active; warn_only
    keeps CUDA ops without a deterministic implementation (e.g. cuBLAS without a workspace config) running."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def on_device(t: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
    """A copy of ``t`` on DEVICE with the same sizes and strides (a column slice stays a column slice)."""
    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t.detach())
    return copy.requires_grad_(requires_grad)


def factor_for(dtype) -> float:
    """bf16 keeps 8 mantissa bits: its sums of many rounded products get twice the fp16 budget."""
    return 2.0 if dtype == torch.bfloat16 else 1.0


# ------------------------------------------------------------------------------------------------ entropy

ENTROPY_SHAPES = sized({"rows7-v7": (7, 7), "rows64-v16384": (64, 16384), "rows5-v2049": (5, 2049),
                        "rows3-v100003": (3, 100003)}, {"rows7-v7": (7, 7), "rows3-v2049": (3, 2049)})
LINEAR_SHAPES = sized({"n37-d64-v16389": (37, 64, 16389), "n300-d256-v4096": (300, 256, 4096)},
                      {"n5-d16-v70": (5, 16, 70)})


@pytest.mark.parametrize("backend,dtype,shape", backend_dtypes(shape=ENTROPY_SHAPES))
def test_token_entropy_gpu(backend, dtype, shape):
    rows, vocab = shape
    wide = (torch.randn(rows, vocab + 3) * 2.5).to(dtype)
    logits = wide[:, 3:]  # rows start off 16-byte alignment, row stride != vocab
    logits[0, ::3] = float("-inf")  # a masked vocabulary
    logits[1, :] = float("nan")  # NaN anywhere gives NaN: all NaN, or only the first vectors of a row
    logits[2, :16] = float("nan")
    with poisoned():
        out = dk.token_entropy(on_device(logits), temperature=0.8, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (rows,) and out.device.type == DEVICE.type
    assert_close(out.cpu(), entropy_reference(logits, 0.8), dtype)


@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_token_entropy_gpu_special_rows(backend, dtype):
    logits = torch.randn(4, sized(3000, 300))
    logits[0] = float("-inf")  # no distribution: NaN
    logits[1, 1:] = float("-inf")  # one finite entry: 0
    logits[2] *= 1e4  # near one-hot, must not overflow
    logits[3] = logits[3] * 3 + 1e4  # large offset
    logits = logits.to(dtype)
    with poisoned():
        out = dk.token_entropy(on_device(logits), backend=backend).cpu()
    assert torch.isnan(out[0]) and out[1] == 0 and torch.isfinite(out[2:]).all()
    assert_close(out, entropy_reference(logits), dtype)


@pytest.mark.parametrize("backend,dtype,shape", backend_dtypes(shape=LINEAR_SHAPES))
def test_linear_entropy_gpu(backend, dtype, shape):
    n, d, vocab = shape
    hidden, weight, bias = torch.randn(n, d).to(dtype), (torch.randn(vocab, d) / d ** 0.5).to(dtype), \
        torch.randn(vocab).to(dtype)
    with poisoned():
        out = dk.linear_entropy(on_device(hidden), on_device(weight), on_device(bias), temperature=0.9, backend=backend)
    expected = entropy_naive.linear_entropy_reference(hidden.double(), weight.double(), bias.double(), 0.9)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert_close(out.cpu(), expected, dtype, factor_for(dtype))


# ------------------------------------------------------------------------------------------ gather / scatter

GATHER_CASES = sized(list(PATCH_CASES), ["ragged_d7", "ragged_d64"])

@pytest.mark.parametrize("backend,dtype,reduce,case,layout",
                         backend_dtypes(reduce=REDUCTIONS, case=GATHER_CASES,
                                        layout={"contiguous": False, "column_slice": True}))
def test_patch_gather_gpu(backend, dtype, reduce, case, layout):
    lengths, cols = PATCH_CASES[case]
    cu = cu_from_lengths(lengths)
    x = packed_tokens(int(cu[-1]), cols, dtype, column_slice=layout)
    grad_out = torch.randn(len(lengths), cols).to(dtype)
    x_gpu = on_device(x, requires_grad=True)
    with poisoned():
        out = dk.patch_gather(x_gpu, cu.to(DEVICE), reduce=reduce, backend=backend)
        out.backward(on_device(grad_out))
    expected, expected_grad = reference_gather(x, cu, reduce, grad_out)
    assert out.dtype == dtype and out.shape == (len(lengths), cols)
    assert_close(out.cpu(), expected, dtype)
    assert_close(x_gpu.grad.cpu(), expected_grad, dtype)


@pytest.mark.parametrize("backend,dtype,case", backend_dtypes(case=GATHER_CASES))
def test_patch_scatter_gpu(backend, dtype, case):
    lengths, cols = PATCH_CASES[case]
    cu = cu_from_lengths(lengths)
    total = int(cu[-1])
    y = torch.randn(len(lengths), cols + 2).to(dtype)[:, 1:1 + cols]  # row stride > cols
    grad_out = torch.randn(total, cols).to(dtype)
    y_gpu = on_device(y, requires_grad=True)
    with poisoned():
        out = dk.patch_scatter(y_gpu, cu.to(DEVICE), backend=backend)
        out.backward(on_device(grad_out))
    y64 = y.double().requires_grad_(True)
    expected = dk.patch_scatter(y64, cu, backend="torch")
    expected.backward(grad_out.double())
    assert out.dtype == dtype and out.shape == (total, cols)
    assert torch.equal(out.cpu().double(), expected.detach())  # a copy is exact
    assert_close(y_gpu.grad.cpu(), y64.grad, dtype)


# ------------------------------------------------------------------------------------------------ attention

# Empty sequences (first and inside), one token, several tiles each way, one long sequence among short ones.
RAGGED = sized([0, 1, 17, 300, 64, 0, 129, 2], [0, 1, 17, 0, 2])
# Lq != Lk: decoding (Lq < Lk), queries that see no key (causal Lq > Lk), no keys at all.
MIXED = sized(([3, 0, 70, 1, 5, 4, 1], [5, 4, 67, 0, 2, 4, 200]), ([3, 0, 20, 1, 1], [5, 4, 17, 0, 30]))


def check_attention(backend, lengths_q, lengths_k, *, hq, hk, d, dtype, causal, fused=False):
    """Forward (out, lse) and backward (dq, dk, dv) on the GPU against the float64 reference on the CPU."""
    q, k, v, cu_q, cu_k = attention_inputs(lengths_q, lengths_k, hq, hk, d, dtype, fused)
    max_q, max_k = max(lengths_q, default=0), max(lengths_k, default=0)
    q_gpu, k_gpu, v_gpu = (on_device(t, requires_grad=True) for t in (q, k, v))
    dout = torch.randn(q.shape).to(dtype)
    with poisoned():
        out, lse = dk.varlen_attention(q_gpu, k_gpu, v_gpu, cu_q.to(DEVICE), cu_k.to(DEVICE), max_q, max_k,
                                       causal=causal, backend=backend, return_lse=True)
        grads = torch.autograd.grad(out, (q_gpu, k_gpu, v_gpu), on_device(dout))
    ref_out, ref_lse, ref_grads = attention_reference(q, k, v, dout, cu_q, cu_k, max_q, max_k, causal)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, q.shape[0])
    assert_close(out.cpu(), ref_out, dtype)
    assert_close(lse.cpu(), ref_lse, torch.float32 if dtype == torch.float32 else dtype)  # -inf pattern exact
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype, name
        assert_close(got.cpu(), ref, dtype, factor_for(dtype))


@pytest.mark.parametrize("backend,dtype,d,causal",
                         backend_dtypes(d={f"d{d}": d for d in HEAD_DIMS}, causal={"causal": True, "full": False}))
def test_attention_gpu(backend, dtype, d, causal):
    check_attention(backend, RAGGED, RAGGED, hq=4, hk=2, d=d, dtype=dtype, causal=causal)


@pytest.mark.parametrize("backend,dtype,causal", backend_dtypes(causal={"causal": True, "full": False}))
def test_attention_gpu_unequal_lengths_mqa(backend, dtype, causal):
    check_attention(backend, *MIXED, hq=4, hk=1, d=64, dtype=dtype, causal=causal)


@pytest.mark.parametrize("backend,dtype,d", backend_dtypes(d={"d80": 80, "d128": 128}))
def test_attention_gpu_fused_qkv_strides(backend, dtype, d):
    check_attention(backend, RAGGED, RAGGED, hq=2, hk=1, d=d, dtype=dtype, causal=True, fused=True)


@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_attention_gpu_only_empty_sequences(backend, dtype):
    check_attention(backend, [0, 0, 0], [0, 0, 0], hq=2, hk=2, d=64, dtype=dtype, causal=True)
    check_attention(backend, [0, 0], [3, 5], hq=2, hk=2, d=64, dtype=dtype, causal=False)  # keys, no queries


@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_attention_gpu_one_query_per_sequence(backend, dtype):
    """The DPAR patch cross-attention: each patch query sees (non-causal) its 0..4 tokens."""
    lengths_k = torch.randint(0, 5, (sized(400, 20),)).tolist()
    check_attention(backend, [1] * len(lengths_k), lengths_k, hq=4, hk=4, d=64, dtype=dtype, causal=False)


@pytest.mark.parametrize("backend,dtype", backend_dtypes())
def test_attention_gpu_more_sequences_than_a_grid_axis(backend, dtype):
    """70000 one-query sequences (> 65535, the limit of CUDA grid axes 1 and 2), as in a batch of 256 images;
    the reference is naive.py in float64 on the CPU."""
    lengths_k = torch.randint(1, 5, (sized(70_000, 50),), dtype=torch.int32)
    cu_q = cu_from_lengths(torch.ones_like(lengths_k)).to(DEVICE)
    cu_k = cu_from_lengths(lengths_k).to(DEVICE)
    q = torch.randn(lengths_k.numel(), 2, 64, device=DEVICE).to(dtype)
    k, v = (torch.randn(int(cu_k[-1]), 2, 64, device=DEVICE).to(dtype) for _ in range(2))
    with poisoned():
        out = dk.varlen_attention(q, k, v, cu_q, cu_k, 1, 4, causal=False, backend=backend)
    expected = attention_naive.varlen_attention(*(t.cpu().double() for t in (q, k, v)), cu_q.cpu(), cu_k.cpu(), 1, 4,
                                                1 / 8, False)[0]
    assert_close(out, expected, dtype)



# ------------------------------------------------------------------------------------------------ kv-cache decoding


@pytest.mark.parametrize("backend,dtype,d,sq", backend_dtypes(d={f"d{d}": d for d in (64, 128)},
                                                              sq={"sq1": 1, "sq5": 5}))
def test_kvcache_attention_gpu(backend, dtype, d, sq):
    """Decode step with GQA 8/2, an empty row, a long row (several KV splits) and an overflowing length; the in-place
    cache writes are checked too."""
    s_max = sized(2048, 64)
    q = torch.randn(4, sq, 8, d).to(dtype)
    k_cache, v_cache = (torch.randn(4, s_max, 2, d).to(dtype) for _ in range(2))
    k_new, v_new = (torch.randn(4, sq, 2, d).to(dtype) for _ in range(2))
    seqlens = torch.tensor([0, 17, s_max - sq, s_max + 3], dtype=torch.int32)
    kc, vc = on_device(k_cache), on_device(v_cache)
    with poisoned():
        out = dk.kvcache_attention(on_device(q), kc, vc, seqlens.to(DEVICE), on_device(k_new), on_device(v_new),
                                   causal=True, backend=backend)
    ref_out, ref_k, ref_v = kvcache_reference(q, k_cache, v_cache, seqlens, k_new, v_new, causal=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out.cpu(), ref_out, dtype)
    assert_close(kc.cpu(), ref_k, dtype)
    assert_close(vc.cpu(), ref_v, dtype)
