"""dk.varlen_attention on CPU backends (torch reference and C++ "cpu") against a dense float64 reference.

The Triton kernels have their own file (test_attention_triton.py); here "triton" only appears for its head-dim check.
"""
import math

import pytest
import torch
from helpers import TOLERANCE, assert_close, cpu_backends, cu_from_lengths, rel_error, requires_extension
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import dpar_kernels as dk

BACKENDS = [b for b in ("torch", "cpu") if b in cpu_backends()]
LOW_PRECISION = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ reference

def _segments(cu: torch.Tensor):
    """Per token: segment id, position in its segment; and the segment lengths."""
    lengths = (cu[1:] - cu[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(int(cu[-1])) - cu[:-1].long()[seg]
    return seg, pos, lengths


def allowed_pairs(cu_q, cu_k, causal: bool) -> torch.Tensor:
    """Bool [total_q, total_k]: query i may attend to key j (same segment, bottom-right causal)."""
    seg_q, pos_q, len_q = _segments(cu_q)
    seg_k, pos_k, len_k = _segments(cu_k)
    allowed = seg_q[:, None] == seg_k[None, :]
    if causal:
        shift = (len_k - len_q)[seg_q]
        allowed &= pos_k[None, :] <= (shift + pos_q)[:, None]
    return allowed


def dense_reference(q, k, v, cu_q, cu_k, scale, causal):
    """Block-diagonal attention as one dense masked softmax in float64 -> (out [Tq,Hq,d], lse [Hq,Tq])."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = allowed_pairs(cu_q, cu_k, causal)
    sees = allowed.any(-1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = torch.where(allowed & sees[:, None], scores, torch.where(sees[:, None], -math.inf, 0.0))
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(allowed, torch.exp(scores - lse[..., None]), 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, torch.where(sees, lse, -math.inf)


def make_inputs(lengths_q, lengths_k, heads_q, heads_k, d, dtype, requires_grad=True, strided=False):
    """Random q, k, v; strided: q a head slice of a wider tensor and k, v the halves of one fused kv (as in the
    model), none of them contiguous."""
    cu_q, cu_k = cu_from_lengths(lengths_q), cu_from_lengths(lengths_k)
    if strided:
        q = torch.randn(int(cu_q[-1]), heads_q + 1, d, dtype=dtype, requires_grad=requires_grad)[:, 1:]
        k, v = torch.randn(int(cu_k[-1]), 2 * heads_k, d, dtype=dtype, requires_grad=requires_grad).chunk(2, dim=1)
        return q, k, v, cu_q, cu_k
    q = torch.randn(int(cu_q[-1]), heads_q, d, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), heads_k, d, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), heads_k, d, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, cu_q, cu_k


@pytest.fixture
def poisoned_outputs():
    """Every torch.empty (also inside the extension) returns NaN-filled memory while the test runs."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def check_against_reference(backend, dtype, lengths_q, lengths_k, heads_q, heads_k, d, causal, factor=1.0,
                            strided=False):
    q, k, v, cu_q, cu_k = make_inputs(lengths_q, lengths_k, heads_q, heads_k, d, dtype, strided=strided)
    scale = 1.0 / math.sqrt(d)
    out, lse = dk.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q, default=0), max(lengths_k, default=0),
                                   causal=causal, return_lse=True, backend=backend)
    grad_out = torch.randn_like(out)
    dq, dk_, dv = torch.autograd.grad(out, (q, k, v), grad_out)

    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_reference(*ref_inputs, cu_q, cu_k, scale, causal)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for t in (out, lse, dq, dk_, dv):
        assert not torch.isnan(t).any()
    assert_close(out, ref_out, dtype, factor)
    lse_tol = TOLERANCE[dtype] if dtype == torch.float64 else 1e-5  # lse is computed from rounded inputs exactly
    assert rel_error(lse, ref_lse) <= lse_tol * factor
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk_, dv), ref_grads):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, factor)


# ---------------------------------------------------------------------------------------------- correctness

CASES = {
    # name: (lengths_q, lengths_k, heads_q, heads_k, d, causal)
    "ragged_gqa": ([0, 1, 7, 70, 33, 2], [0, 1, 7, 70, 33, 2], 4, 2, 64, True),
    "one_long_among_short": ([150, 3, 1, 5], [150, 3, 1, 5], 2, 2, 32, True),
    "kv_cache_decode": ([1, 3, 0, 5, 2], [9, 40, 4, 5, 70], 4, 1, 64, True),
    "more_queries_than_keys": ([9, 40, 4, 3], [3, 17, 0, 3], 3, 3, 32, True),
    "mqa_noncausal": ([5, 0, 66, 2], [8, 3, 66, 0], 6, 1, 32, False),
    "patch_cross_attention": ([1, 1, 1, 1, 1], [1, 4, 0, 3, 2], 4, 4, 64, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_reference(backend, dtype, case, poisoned_outputs):
    check_against_reference(backend, dtype, *CASES[case])


# Short queries: the C++ forward loads key blocks per item when every sequence's queries fit one 32-row block, and
# tiles of at most 4 query rows (forward and fused backward) score against key rows instead of transposed blocks;
# longer sequences use the shared per-call key tiles. Each case pins which paths run (see csrc/cpu/attention.cpp).
SHORT_CASES = {
    # name: (lengths_q, lengths_k)
    "one_query_over_0_1_2_5_70_keys": ([1, 1, 1, 1, 1], [0, 1, 2, 5, 70]),  # row dots, 70 keys: two key blocks
    "up_to_4_queries_mixed": ([4, 1, 3, 2, 1, 0], [2, 0, 5, 1, 3, 4]),  # row dots; causal Lq > Lk: blind rows
    "up_to_32_queries": ([20, 1, 32, 5], [5, 70, 32, 0]),  # per-item transposed blocks (rows > 4)
    "one_long_sequence_among_single_queries": ([1, 1, 40, 1], [0, 2, 40, 5]),  # shared key tiles
    "single_queries_one_long_key_sequence": ([1, 1, 1], [2, 130, 1]),  # short path, row dots over 3 key blocks
}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(SHORT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_short_query_tiles_match_reference(backend, dtype, case, causal, strided, poisoned_outputs):
    lengths_q, lengths_k = SHORT_CASES[case]
    check_against_reference(backend, dtype, lengths_q, lengths_k, 4, 2, 16, causal, strided=strided)


@requires_extension
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("d", [16, 64, 7])
def test_patch_cross_attention_shape(threads, d):
    """The model's patch cross-attention: one query per patch over its 1..4 tokens, k/v halves of one projection,
    many sequences (small items in memory order, spread over the threads)."""
    lengths_k = torch.randint(1, 5, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference("cpu", torch.float32, [1] * len(lengths_k), lengths_k, 4, 4, d, False, strided=True)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128, 40, 7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dims(backend, d):
    check_against_reference(backend, torch.float32, [3, 65, 20], [3, 65, 20], 2, 1, d, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_lengths(backend):
    gen = torch.Generator().manual_seed(1)
    for causal in (True, False):
        lengths_q = torch.randint(0, 90, (7,), generator=gen).tolist()
        lengths_k = [lq + int(torch.randint(0, 20, (1,), generator=gen)) for lq in lengths_q]
        check_against_reference(backend, torch.float32, lengths_q, lengths_k, 4, 2, 64, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, causal):
    q, k, v, cu_q, cu_k = make_inputs([3, 0, 1, 4], [2, 1, 0, 5], 2, 1, 5, torch.float64)
    fn = lambda q, k, v: dk.varlen_attention(q, k, v, cu_q, cu_k, 4, 5, causal=causal, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_qkv_slices_and_oversized_max_seqlen(backend):
    """q/k/v as strided views of one [T, 3, H, d] tensor; max_seqlen larger than needed changes nothing."""
    lengths = [5, 70, 0, 12]
    cu = cu_from_lengths(lengths)
    qkv = torch.randn(sum(lengths), 3, 4, 32, requires_grad=True)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    out = dk.varlen_attention(q, k, v, cu, cu, 500, 1000, backend=backend)
    grad_out = torch.randn_like(out)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    dense = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref_out = dk.varlen_attention(*dense, cu, cu, 70, 70, backend=backend)
    ref_grads = torch.autograd.grad(ref_out, dense, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad_qkv, torch.stack(ref_grads, 1), rtol=0, atol=0)
    check_against_reference(backend, torch.float32, lengths, lengths, 4, 4, 32, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_without_keys_give_zero_output_and_gradients(backend):
    q, k, v, cu_q, cu_k = make_inputs([4, 3], [2, 0], 2, 2, 32, torch.float32)
    out, lse = dk.varlen_attention(q, k, v, cu_q, cu_k, 4, 2, return_lse=True, backend=backend)
    # bottom-right causal with Lq=4 > Lk=2: the first two queries see nothing; the second sequence has no keys
    hidden = torch.tensor([True, True, False, False, True, True, True])
    assert torch.equal(out[hidden], torch.zeros_like(out[hidden]))
    assert torch.isneginf(lse[:, hidden]).all() and torch.isfinite(lse[:, ~hidden]).all()
    out.sum().backward()
    assert torch.equal(q.grad[hidden], torch.zeros_like(q.grad[hidden]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@requires_extension
def test_cpu_backend_deterministic():
    q, k, v, cu_q, cu_k = make_inputs([100, 7, 64], [100, 7, 64], 4, 2, 64, torch.float32)
    grads = []
    for _ in range(2):
        out = dk.varlen_attention(q, k, v, cu_q, cu_k, 100, 100, backend="cpu")
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@requires_extension
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lengths", [[520], [200, 0, 200, 3, 200, 180]])
def test_cpu_backward_fused_and_two_pass_schedules(threads, lengths):
    """The C++ backward runs one fused pass per (sequence, kv head) unless one such item would dominate a
    thread's share: then it splits into a dK/dV and a dQ pass. With 2 threads, [520] takes the split and the
    balanced batch the fused pass; with 1 thread both take the fused pass. Every schedule must match the reference."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference("cpu", torch.float32, lengths, lengths, 2, 1, 32, True)
    finally:
        torch.set_num_threads(previous)


def test_empty_batch_and_all_empty_sequences():
    for backend in BACKENDS:
        q, k, v, cu_q, cu_k = make_inputs([0, 0], [0, 3], 2, 1, 32, torch.float32)
        out = dk.varlen_attention(q, k, v, cu_q, cu_k, 0, 3, backend=backend)
        assert out.shape == (0, 2, 32)
        out.sum().backward()
        assert torch.equal(k.grad, torch.zeros_like(k))


# ------------------------------------------------------------------------------------------------ bad input

def _valid():
    q, k, v, cu_q, cu_k = make_inputs([3, 5], [3, 5], 4, 2, 32, torch.float32, requires_grad=False)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5)


BAD_INPUTS = {
    "cu_int64": (dict(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, "cu_seqlens_q must be int32"),
    "cu_decreasing": (dict(cu_seqlens_k=torch.tensor([0, 6, 5, 8], dtype=torch.int32)), ValueError,
                      "cu_seqlens_k must be non-decreasing"),
    "cu_not_from_zero": (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError,
                         "cu_seqlens_q must start at 0"),
    "cu_wrong_total": (dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
                       "cu_seqlens_k must end at the total length 8"),
    "batch_mismatch": (dict(cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32)), ValueError,
                       "same number of sequences"),
    "heads_not_multiple": (dict(k=torch.randn(8, 3, 32), v=torch.randn(8, 3, 32)), ValueError,
                           r"query heads \(4\) must be a multiple"),
    "dtype_mismatch": (dict(k=torch.randn(8, 2, 32, dtype=torch.float16),
                            v=torch.randn(8, 2, 32, dtype=torch.float16)), TypeError, "share a dtype"),
    "head_dim_mismatch": (dict(k=torch.randn(8, 2, 16), v=torch.randn(8, 2, 16)), ValueError, "same head dim"),
    "max_seqlen_small": (dict(max_seqlen_q=4), ValueError, "max_seqlen_q=4 is smaller"),
    "int_tensor": (dict(q=torch.ones(8, 4, 32, dtype=torch.int32)), TypeError, "q must have dtype"),
    "rank": (dict(v=torch.randn(8, 64)), ValueError, "v must be 3-D"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises(backend, case):
    change, error, message = BAD_INPUTS[case]
    args = {**_valid(), **change}
    with pytest.raises(error, match=message):
        dk.varlen_attention(**args, backend=backend)


def test_unsupported_head_dim_on_triton_names_it():
    q, k, v, cu_q, cu_k = make_inputs([3], [3], 2, 2, 40, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="head dim 40 is not supported by backend 'triton'"):
        dk.varlen_attention(q, k, v, cu_q, cu_k, 3, 3, backend="triton")


@requires_extension
def test_extension_op_checks_its_inputs():
    """Direct calls of the C++ op bypass the Python checks: they must raise, never crash."""
    a = _valid()
    op = torch.ops.dpar_C.varlen_attention
    base = (a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 5, 5, 0.1, True)
    bad = {
        3: torch.tensor([0, 3, 9], dtype=torch.int32),  # past the end of q
        4: torch.tensor([0, 9, 8], dtype=torch.int32),  # decreasing
        1: torch.randn(8, 3, 32),
        2: torch.randn(8, 2, 16),
    }
    for index, value in bad.items():
        args = list(base)
        args[index] = value
        with pytest.raises(RuntimeError):
            op(*args)
    with pytest.raises(RuntimeError, match="lse"):
        out, lse = op(*base)
        torch.ops.dpar_C.varlen_attention_backward(out, *base[:3], out, lse[:, :4], *base[3:])


# ------------------------------------------------------------------------------------ FLOPs, compile, module

def brute_force_pairs(cu_q, cu_k, causal) -> int:
    return int(allowed_pairs(cu_q, cu_k, causal).sum())


@pytest.mark.parametrize("causal", [True, False])
def test_flop_counter_counts_attended_pairs(causal):
    heads, d = 3, 32
    q, k, v, cu_q, cu_k = make_inputs([5, 0, 17, 2, 9], [5, 4, 30, 0, 3], heads, 1, d, torch.float32)
    pairs = brute_force_pairs(cu_q, cu_k, causal)
    assert dk.attended_pairs(cu_q, cu_k, causal) == pairs
    with FlopCounterMode(display=False) as forward_counter:
        out = dk.varlen_attention(q, k, v, cu_q, cu_k, 17, 30, causal=causal, backend="torch")
    assert forward_counter.get_total_flops() == 4 * heads * d * pairs
    with FlopCounterMode(display=False) as backward_counter:
        out.sum().backward()
    assert backward_counter.get_total_flops() == 10 * heads * d * pairs


def test_flop_count_equals_sdpa_on_one_sequence():
    """Non-causal (torch counts SDPA's full square even with a mask). CPU SDPA kernels are not in torch's flop
    registry, so the SDPA side is torch's own formula for its (GPU) SDPA ops on the same shapes."""
    length, heads, d = 24, 4, 64
    q, k, v, cu, _ = make_inputs([length], [length], heads, heads, d, torch.float32)
    with FlopCounterMode(display=False) as forward_counter:
        out = dk.varlen_attention(q, k, v, cu, cu, length, length, causal=False, backend="torch")
    with FlopCounterMode(display=False) as backward_counter:
        out.sum().backward()
    shape = (1, heads, length, d)
    assert forward_counter.get_total_flops() == flop_counter.sdpa_flop_count(shape, shape, shape)
    assert backward_counter.get_total_flops() == flop_counter.sdpa_backward_flop_count(shape, shape, shape, shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    q, k, v, cu_q, cu_k = make_inputs([6, 0, 20], [6, 3, 25], 4, 2, 32, torch.float32)

    def step(q, k, v):
        out = dk.varlen_attention(q * 1.5, k, v, cu_q, cu_k, 20, 25, backend=backend)
        return (out.float() ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_varlen_attention_module():
    module = dk.VarlenAttention(causal=True)
    q, k, v, cu_q, cu_k = make_inputs([4, 9], [4, 9], 2, 2, 32, torch.float32)
    out = module(q, k, v, cu_q, cu_k, 9, 9)
    ref, _ = dense_reference(q, k, v, cu_q, cu_k, 1 / math.sqrt(32), True)
    assert_close(out, ref, torch.float32)
    out.sum().backward()
    assert q.grad is not None and "causal=True" in repr(module)
