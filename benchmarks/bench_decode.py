"""Per-call cost at decode shapes on CPU: kvcache_attention vs torch SDPA, patch_gather vs segment_reduce and
token_entropy vs eager torch at tiny shapes (where per-call Python overhead dominates).

    pytest benchmarks/bench_decode.py --benchmark-only      (DPAR_BENCH_QUICK=1: fewer rounds)
    python -m benchmarks.bench_decode                       (interleaved rounds, best of each, threads 1)

Decode attention: B=16 rows, H=4 heads, one query each, a full cache of S=256 keys, d in {16, 64}; SDPA takes the
same data as [B, H, 1, d] x [B, H, S, d], kvcache_attention as [B, 1, H, d] x [B, S, H, d] (flash-attn layout).
The table at the end prints each dk op's speed-up over its torch baseline, measured in the same run.
"""
import os
import time

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


def decode_attention_cases(head_dim: int) -> dict:
    """{impl: closure}, baseline first; checks that both compute the same attention."""
    q, k_cache, v_cache, lengths, (sq, sk, sv) = _decode_problem(head_dim)
    expected = F.scaled_dot_product_attention(sq, sk, sv).transpose(1, 2)
    torch.testing.assert_close(dk.kvcache_attention(q, k_cache, v_cache, lengths, backend="cpu"), expected)
    return {"torch SDPA": lambda: F.scaled_dot_product_attention(sq, sk, sv),
            "dk.kvcache_attention (cpu)": lambda: dk.kvcache_attention(q, k_cache, v_cache, lengths, backend="cpu")}


def patch_gather_cases() -> dict:
    x = torch.randn(TINY_TOKENS, TINY_WIDTH)
    lengths = torch.full((TINY_PATCHES,), TINY_TOKENS // TINY_PATCHES, dtype=torch.int32)
    cu = dk.lengths_to_cu_seqlens(lengths)
    return {"torch.segment_reduce": lambda: torch.segment_reduce(x, "max", lengths=lengths, axis=0, unsafe=True),
            "dk.patch_gather (cpu)": lambda: dk.patch_gather(x, cu, reduce="max", backend="cpu")}


def _eager_entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def token_entropy_cases() -> dict:
    logits = torch.randn(ROWS, TINY_VOCAB)
    return {"eager torch": lambda: _eager_entropy(logits),
            "dk.token_entropy (cpu)": lambda: dk.token_entropy(logits, backend="cpu")}


GROUPS = {f"decode attention B{ROWS} H{HEADS} S{KEYS} d16": lambda: decode_attention_cases(16),
          f"decode attention B{ROWS} H{HEADS} S{KEYS} d64": lambda: decode_attention_cases(64),
          f"tiny patch_gather {TINY_TOKENS}x{TINY_WIDTH}": patch_gather_cases,
          f"tiny token_entropy {ROWS}x{TINY_VOCAB}": token_entropy_cases}
IMPLS = (("torch SDPA", "dk.kvcache_attention (cpu)"),) * 2 + (("torch.segment_reduce", "dk.patch_gather (cpu)"),
                                                                ("eager torch", "dk.token_entropy (cpu)"))
CASES = [(group, impl) for group, impls in zip(GROUPS, IMPLS) for impl in impls]  # baseline first


@pytest.mark.parametrize("group,impl", CASES, ids=lambda v: str(v).replace(" ", "-"))
def test_decode_shaped_op(benchmark, ratios, group, impl):
    cases = GROUPS[group]()
    _run(benchmark, ratios, group, impl, cases[impl], baseline=impl == next(iter(cases)))


def test_case_names_match_the_builders():
    assert [impl for group, build in GROUPS.items() for impl in build()] == [impl for _, impl in CASES]


def main(rounds: int = 7, calls: int = 200) -> None:
    """Interleaves the implementations of each group and prints the best time per call and the ratio."""
    torch.set_num_threads(1)
    for group, build in GROUPS.items():
        cases, best = build(), {}
        for _ in range(rounds):
            for impl, fn in cases.items():
                fn()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[impl] = min(best.get(impl, float("inf")), (time.perf_counter() - start) / calls)
        base, impl = next(iter(cases)), list(cases)[1]
        print(f"{group}: {base} {best[base] * 1e6:.1f} us, {impl} {best[impl] * 1e6:.1f} us, "
              f"speed-up {best[base] / best[impl]:.2f}x")


if __name__ == "__main__":
    main()
