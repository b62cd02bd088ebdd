"""The CUDA backend of dk.varlen_attention on a GPU, forward and backward, against the float64 torch reference.

Skipped without a CUDA device and an extension built with CUDA kernels (tests/csrc/test_cuda_attention_host.py checks
the same kernel code on the host). `check_against_reference` is backend-agnostic.
"""
import pytest
import torch
from helpers import assert_close, cu_from_lengths

import dpar_kernels as dk
from dpar_kernels import _extension
from dpar_kernels.attention import naive

needs_cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and _extension.HAS_CUDA_OPS),
                                        reason="needs a CUDA device and dpar_kernels._C built with CUDA")


def _inputs(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, device, strided):
    """Random q, k, v needing grad (views into wider tensors when strided) and int32 offsets."""
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    extra = 2 if strided else 0
    q = torch.randn(total_q, heads_q + extra, head_dim, device=device).to(dtype)[:, extra:]
    if strided:
        kv = torch.randn(total_k, 2 * heads_kv + extra, head_dim, device=device).to(dtype)
        k, v = kv[:, :heads_kv], kv[:, heads_kv + extra:]
    else:
        k, v = (torch.randn(total_k, heads_kv, head_dim, device=device).to(dtype) for _ in range(2))
    assert strided == (k.stride(0) != heads_kv * head_dim)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    cu_q = cu_from_lengths(lengths_q).to(device)
    cu_k = cu_from_lengths(lengths_k).to(device)
    return leaves, cu_q, cu_k


def check_against_reference(backend, device, dtype, head_dim, heads_q, heads_kv, causal, lengths, strided):
    (q, k, v), cu_q, cu_k = _inputs(*lengths, heads_q, heads_kv, head_dim, dtype, device, strided)
    max_q, max_k = max(lengths[0]), max(lengths[1])
    out, lse = dk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, return_lse=True,
                                   backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (heads_q, sum(lengths[0]))
    dout = torch.randn_like(out)
    dq, dk_, dv = torch.autograd.grad(out, (q, k, v), dout)

    cpu64 = [t.detach().cpu().double() for t in (q, k, v)]
    scale = head_dim ** -0.5
    out_ref, lse_ref = naive.varlen_attention(*cpu64, cu_q.cpu(), cu_k.cpu(), max_q, max_k, scale, causal)
    grads_ref = naive.varlen_attention_backward(dout.cpu().double(), *cpu64, out_ref, lse_ref, cu_q.cpu(),
                                                cu_k.cpu(), max_q, max_k, scale, causal)
    assert_close(out.detach().cpu(), out_ref, dtype)
    assert_close(lse.cpu(), lse_ref, dtype)
    for actual, expected in zip((dq, dk_, dv), grads_ref):
        assert actual.dtype == dtype and not torch.isnan(actual).any()
        assert_close(actual.cpu(), expected, dtype, factor=2.0 if dtype == torch.bfloat16 else 1.0)


MIXED = ([3, 0, 70, 1, 5, 4, 129], [5, 4, 67, 0, 2, 4, 300])
CASES = [
    # dtype, head_dim, heads_q, heads_kv, causal, lengths, strided
    (torch.float32, 64, 4, 2, True, MIXED, False),
    (torch.float32, 96, 2, 1, False, ([1] * 20 + [0], list(range(21))), True),  # patch cross-attention shape
    (torch.float16, 32, 4, 1, False, MIXED, False),
    (torch.float16, 128, 2, 2, True, ([1000], [1000]), True),  # one long sequence
    (torch.float16, 64, 2, 2, True, ([1, 2], [1, 3]), False),  # length-1 sequence (its dq, dk are 0)
    (torch.bfloat16, 80, 2, 2, True, MIXED, True),
    (torch.bfloat16, 96, 6, 3, True, ([300, 17], [100, 40]), False),  # blind queries: Lq > Lk
]


@needs_cuda_kernels
@pytest.mark.parametrize("dtype,head_dim,heads_q,heads_kv,causal,lengths,strided", CASES)
def test_cuda_backend_matches_reference(dtype, head_dim, heads_q, heads_kv, causal, lengths, strided):
    check_against_reference("cuda", "cuda", dtype, head_dim, heads_q, heads_kv, causal, lengths, strided)


@needs_cuda_kernels
def test_cuda_backend_empty_batch():
    (q, k, v), cu_q, cu_k = _inputs([0, 0], [0, 3], 2, 2, 64, torch.float16, "cuda", False)
    out, lse = dk.varlen_attention(q, k, v, cu_q, cu_k, 0, 3, return_lse=True, backend="cuda")
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    (dk_,) = torch.autograd.grad(out.sum(), (k,), allow_unused=True)
    assert dk_ is None or torch.equal(dk_, torch.zeros_like(k))


@needs_cuda_kernels
def test_cuda_backend_rejects_unsupported_head_dim():
    (q, k, v), cu_q, cu_k = _inputs([2], [2], 1, 1, 48, torch.float16, "cuda", False)
    with pytest.raises(ValueError, match="head dim"):
        dk.varlen_attention(q, k, v, cu_q, cu_k, 2, 2, backend="cuda")
