"""Per-call cost at decode shapes on CPU: kvcache_attention vs torch SDPA, patch_gather vs segment_reduce and
token_entropy vs eager torch at tiny shapes (where per-call Python overhead dominates).

    pytest benchmarks/bench_decode.py --benchmark-only      (DPAR_BENCH_QUICK=1: fewer rounds)

Decode attention: B=16 rows, H=4 heads, one query each, a full cache of S=256 keys, d in {16, 64}; SDPA takes the
same data as [B, H, 1, d] x [B, H, S, d], kvcache_attention as [B, 1, H, d] x [B, S, H, d] (flash-attn layout).
The table at the end prints each dk op's speed-up over its torch baseline, measured in the same run.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import dpar_kernels as dk

from .reporting import record

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
ROWS, HEADS, KEYS = 16, 4, 256
TINY_TOKENS, TINY_WIDTH, TINY_PATCHES = 32, 64, 16  # a decode-time patch step: 16 patches of 2 tokens
TINY_VOCAB = 512

pytestmark = pytest.mark.skipif("cpu" not in dk.available_backends(torch.device("cpu")),
                                reason="the dpar_kernels._C extension is not built")


def _run(benchmark, ratios, group, name, fn, baseline):
    record(benchmark, group, name, baseline=baseline, threads=torch.get_num_threads())
    if QUICK:
        benchmark.pedantic(fn, rounds=20, warmup_rounds=2, iterations=5)
    else:
        benchmark(fn)
    ratios.add_time(group, name, benchmark, baseline=baseline)


def _decode_problem(head_dim: int):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(ROWS, 1, HEADS, head_dim, generator=generator)
    k_cache = torch.randn(ROWS, KEYS, HEADS, head_dim, generator=generator)
    v_cache = torch.randn(ROWS, KEYS, HEADS, head_dim, generator=generator)
    lengths = torch.full((ROWS,), KEYS, dtype=torch.int32)
    sdpa = tuple(t.transpose(1, 2).contiguous() for t in (q, k_cache, v_cache))  # [B, H, S, d]
    return q, k_cache, v_cache, lengths, sdpa


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("impl", ["torch SDPA", "dk.kvcache_attention (cpu)"])
def test_decode_attention(benchmark, ratios, impl, head_dim):
    q, k_cache, v_cache, lengths, (sq, sk, sv) = _decode_problem(head_dim)
    group = f"decode attention B{ROWS} H{HEADS} S{KEYS} d{head_dim}"
    if impl == "torch SDPA":
        fn = lambda: F.scaled_dot_product_attention(sq, sk, sv)  # noqa: E731
    else:
        fn = lambda: dk.kvcache_attention(q, k_cache, v_cache, lengths, backend="cpu")  # noqa: E731
    expected = F.scaled_dot_product_attention(sq, sk, sv).transpose(1, 2)
    torch.testing.assert_close(dk.kvcache_attention(q, k_cache, v_cache, lengths, backend="cpu"), expected)
    _run(benchmark, ratios, group, impl, fn, baseline=impl == "torch SDPA")


@pytest.mark.parametrize("impl", ["torch.segment_reduce", "dk.patch_gather (cpu)"])
def test_tiny_patch_gather(benchmark, ratios, impl):
    x = torch.randn(TINY_TOKENS, TINY_WIDTH)
    lengths = torch.full((TINY_PATCHES,), TINY_TOKENS // TINY_PATCHES, dtype=torch.int32)
    cu = dk.lengths_to_cu_seqlens(lengths)
    if impl == "torch.segment_reduce":
        fn = lambda: torch.segment_reduce(x, "max", lengths=lengths, axis=0, unsafe=True)  # noqa: E731
    else:
        fn = lambda: dk.patch_gather(x, cu, reduce="max", backend="cpu")  # noqa: E731
    _run(benchmark, ratios, f"tiny patch_gather {TINY_TOKENS}x{TINY_WIDTH}", impl, fn,
         baseline=impl == "torch.segment_reduce")


def _eager_entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("impl", ["eager torch", "dk.token_entropy (cpu)"])
def test_tiny_token_entropy(benchmark, ratios, impl):
    logits = torch.randn(ROWS, TINY_VOCAB)
    fn = (lambda: _eager_entropy(logits)) if impl == "eager torch" else (  # noqa: E731
        lambda: dk.token_entropy(logits, backend="cpu"))
    _run(benchmark, ratios, f"tiny token_entropy {ROWS}x{TINY_VOCAB}", impl, fn, baseline=impl == "eager torch")
