"""Per-call cost at decode shapes on CPU: kvcache_attention vs torch SDPA, patch_gather vs segment_reduce and
token_entropy vs eager torch at tiny shapes (where per-call Python overhead dominates), varlen_attention at
short-query shapes vs padded SDPA and segment-wise torch math, and dk.linear vs F.linear (MKL) at decode rows.

    pytest benchmarks/bench_decode.py --benchmark-only      (DPAR_BENCH_QUICK=1: fewer rounds)
    python -m benchmarks.bench_decode                       (interleaved rounds, best of each, threads 1)

Decode attention: B=16 rows, H=4 heads, one query each, a full cache of S=256 keys, d in {16, 64}; SDPA takes the
same data as [B, H, 1, d] x [B, H, S, d], kvcache_attention as [B, 1, H, d] x [B, S, H, d] (flash-attn layout).
Short queries (varlen_attention, k/v slices of one fused kv projection as in the model): the patch
cross-attention of dpar/model/blocks.py (P=512 patches = 16 images x 32, one query each over 1-4 tokens, H=4,
non-causal; forward, and forward+backward as in training), decode-like one-query sequences over 2-32 keys, and a
normal training shape (16 causal sequences of 256, d 64) that must not regress. Baselines: SDPA over the keys
gathered into [P, H, Lmax, d] with a key mask, and segment-wise math (per-token scores, segment max/sum).
Decode linear: a layer's matmuls at B rows, cycling through enough weight matrices (~48 MB, like a model's layers)
that each is read from memory as in sampling, plus one weight reused (in cache), where BLAS is at its best.
The table at the end prints each dk op's speed-up over its fastest torch baseline, measured in the same run.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import dpar_kernels as dk

from .reporting import record
from .timing import interleaved_best

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
ROWS, HEADS, KEYS = 16, 4, 256
TINY_TOKENS, TINY_WIDTH, TINY_PATCHES = 32, 64, 16  # a decode-time patch step: 16 patches of 2 tokens
TINY_VOCAB = 512
PATCHES, PATCH_HEADS, MAX_PATCH = 512, 4, 4  # 16 images x 32 patches; one query over 1..MAX_PATCH tokens
SHORT_ROWS, SHORT_KEYS = 64, 32  # decode-like: one query over 2..SHORT_KEYS keys
TRAIN_SEQS, TRAIN_LEN = 16, 256

pytestmark = pytest.mark.skipif("cpu" not in dk.available_backends(torch.device("cpu")),
                                reason="the dpar_kernels._C extension is not built")


def _run(benchmark, ratios, group, name, fn, baseline):
    record(benchmark, group, name, shape=group, baseline=baseline, backend="" if baseline else "cpu",
           threads=torch.get_num_threads())
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


def linear_cases(rows: int, outputs: int, depth: int, weight_bytes: int) -> dict:
    """x [rows, depth] times each of enough [outputs, depth] weights to fill weight_bytes (one weight: in cache)."""
    generator = torch.Generator().manual_seed(0)
    count = max(1, weight_bytes // (outputs * depth * 4))
    weights = [torch.randn(outputs, depth, generator=generator) for _ in range(count)]
    x = torch.randn(rows, depth, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(dk.linear(x, weights[0]), F.linear(x, weights[0]), rtol=1e-5, atol=1e-4)

    def over_weights(linear):
        def run():
            with torch.no_grad():
                for weight in weights:
                    linear(x, weight)
        return run

    return {"F.linear (MKL)": over_weights(F.linear), "dk.linear (cpu)": over_weights(dk.linear)}


def _short_query_problem(key_lengths: list[int], heads: int, head_dim: int, grad: bool):
    """One query per sequence over key_lengths[i] keys; k, v slices of one fused [T, 2H, d] tensor."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor(key_lengths, dtype=torch.int32)
    q = torch.randn(len(key_lengths), heads, head_dim, generator=generator).requires_grad_(grad)
    kv = torch.randn(int(lengths.sum()), 2 * heads, head_dim, generator=generator).requires_grad_(grad)
    return q, kv, lengths


def _padded_sdpa(q, k, v, lengths):
    """SDPA of one query per segment over its keys gathered into [P, H, Lmax, d] with a key mask."""
    longest = int(lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths
    index = (starts[:, None] + torch.arange(longest)).clamp(max=k.shape[0] - 1)  # [P, Lmax]
    mask = (torch.arange(longest) < lengths[:, None])[:, None, None, :]  # [P, 1, 1, Lmax]

    def run():
        kp, vp = (t[index].transpose(1, 2) for t in (k, v))  # [P, H, Lmax, d]
        return F.scaled_dot_product_attention(q[:, :, None], kp, vp, attn_mask=mask)[:, :, 0]
    return run


def _segment_math(q, k, v, lengths):
    """One query per segment, as per-token scores with a segment softmax (index_add sums)."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def run():
        scores = (q[segment] * k).sum(-1) * scale  # [T, H]
        top = torch.segment_reduce(scores.detach(), "max", lengths=lengths, axis=0, unsafe=True)
        weights = (scores - top[segment]).exp()
        total = weights.new_zeros(q.shape[:2]).index_add_(0, segment, weights)
        return v.new_zeros(q.shape).index_add_(0, segment, v * (weights / total[segment])[..., None])
    return run


def _with_backward(fn, inputs):
    """fn() followed by the gradients of its output (a fixed random cotangent) w.r.t. inputs."""
    cotangent = {}

    def run():
        out = fn()
        grad = cotangent.setdefault("g", torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return torch.autograd.grad(out, inputs, grad)
    return run


def short_query_cases(key_lengths: list[int], head_dim: int, backward: bool) -> dict:
    """{impl: closure}, torch baselines first, for one query per sequence over key_lengths keys (non-causal)."""
    q, kv, lengths = _short_query_problem(key_lengths, PATCH_HEADS, head_dim, backward)
    k, v = kv.chunk(2, dim=1)
    cu_k = dk.lengths_to_cu_seqlens(lengths)
    cu_q = torch.arange(len(key_lengths) + 1, dtype=torch.int32)
    longest = max(key_lengths)
    impls = {"torch padded SDPA": _padded_sdpa(q, k, v, lengths),
             "torch segment math": _segment_math(q, k, v, lengths),
             "dk.varlen_attention (cpu)": lambda: dk.varlen_attention(q, k, v, cu_q, cu_k, 1, longest, causal=False,
                                                                      backend="cpu")}
    with torch.no_grad():
        expected = impls["torch padded SDPA"]()
        for fn in impls.values():
            torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-5)
    return {name: _with_backward(fn, (q, kv)) if backward else _no_grad(fn) for name, fn in impls.items()}


def _no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def _mixed_lengths(count: int, low: int, high: int) -> list[int]:
    generator = torch.Generator().manual_seed(2)
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


def training_attention_cases() -> dict:
    """Causal self-attention of TRAIN_SEQS sequences of TRAIN_LEN, forward+backward, vs SDPA on the same data."""
    generator = torch.Generator().manual_seed(0)
    tokens = TRAIN_SEQS * TRAIN_LEN
    qkv = torch.randn(tokens, 3 * PATCH_HEADS, 64, generator=generator, requires_grad=True)
    q, k, v = qkv.chunk(3, dim=1)
    cu = torch.arange(0, tokens + 1, TRAIN_LEN, dtype=torch.int32)
    as_batch = lambda t: t.unflatten(0, (TRAIN_SEQS, TRAIN_LEN)).transpose(1, 2)  # noqa: E731  [B, H, L, d]
    sdpa = lambda: F.scaled_dot_product_attention(*map(as_batch, (q, k, v)), is_causal=True)  # noqa: E731
    ours = lambda: dk.varlen_attention(q, k, v, cu, cu, TRAIN_LEN, TRAIN_LEN, backend="cpu")  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(ours(), sdpa().transpose(1, 2).flatten(0, 1), rtol=1e-4, atol=1e-5)
    return {"torch SDPA": _with_backward(sdpa, (qkv,)), "dk.varlen_attention (cpu)": _with_backward(ours, (qkv,))}


_WEIGHT_SETS = {"weights from memory (48 MB)": 48 << 20, "one weight in cache": 0}
_PATCH_LENGTHS = _mixed_lengths(PATCHES, 1, MAX_PATCH)
_SHORT_LENGTHS = _mixed_lengths(SHORT_ROWS, 2, SHORT_KEYS)
_PATCH = f"patch cross-attn P{PATCHES} H{PATCH_HEADS} L1-{MAX_PATCH}"
_SHORT = f"one-query varlen B{SHORT_ROWS} H{PATCH_HEADS} L2-{SHORT_KEYS}"
GROUPS = {f"decode attention B{ROWS} H{HEADS} S{KEYS} d16": lambda: decode_attention_cases(16),
          f"decode attention B{ROWS} H{HEADS} S{KEYS} d64": lambda: decode_attention_cases(64),
          f"tiny patch_gather {TINY_TOKENS}x{TINY_WIDTH}": patch_gather_cases,
          f"tiny token_entropy {ROWS}x{TINY_VOCAB}": token_entropy_cases,
          f"{_PATCH} d16 fwd": lambda: short_query_cases(_PATCH_LENGTHS, 16, backward=False),
          f"{_PATCH} d64 fwd": lambda: short_query_cases(_PATCH_LENGTHS, 64, backward=False),
          f"{_PATCH} d16 fwd+bwd": lambda: short_query_cases(_PATCH_LENGTHS, 16, backward=True),
          f"{_PATCH} d64 fwd+bwd": lambda: short_query_cases(_PATCH_LENGTHS, 64, backward=True),
          f"{_SHORT} d16 fwd": lambda: short_query_cases(_SHORT_LENGTHS, 16, backward=False),
          f"{_SHORT} d64 fwd": lambda: short_query_cases(_SHORT_LENGTHS, 64, backward=False),
          f"train causal {TRAIN_SEQS}x{TRAIN_LEN} H{PATCH_HEADS} d64 fwd+bwd": training_attention_cases,
          **{f"decode linear {rows}x256 -> {outputs}, {name}":
             (lambda r=rows, o=outputs, b=size: linear_cases(r, o, 256, b))
             for rows, outputs in ((16, 768), (1, 768), (16, 4096)) for name, size in _WEIGHT_SETS.items()}}
_LINEAR_IMPLS = ("F.linear (MKL)", "dk.linear (cpu)")
_SHORT_IMPLS = ("torch padded SDPA", "torch segment math", "dk.varlen_attention (cpu)")
IMPLS = ((("torch SDPA", "dk.kvcache_attention (cpu)"),) * 2
         + (("torch.segment_reduce", "dk.patch_gather (cpu)"), ("eager torch", "dk.token_entropy (cpu)"))
         + (_SHORT_IMPLS,) * 6 + (("torch SDPA", "dk.varlen_attention (cpu)"),) + (_LINEAR_IMPLS,) * 6)
CASES = [(group, impl) for group, impls in zip(GROUPS, IMPLS) for impl in impls]  # baselines first


@pytest.mark.parametrize("group,impl", CASES, ids=lambda v: str(v).replace(" ", "-"))
def test_decode_shaped_op(benchmark, ratios, group, impl):
    cases = GROUPS[group]()
    _run(benchmark, ratios, group, impl, cases[impl], baseline=not impl.startswith("dk."))


def test_case_names_match_the_builders():
    assert [impl for group, build in GROUPS.items() for impl in build()] == [impl for _, impl in CASES]


def main(rounds: int = 7, budget: float = 0.05, threads: int = 1, only: str = "") -> None:
    """Interleaves the implementations of each group (those whose name contains `only`) and prints the best time
    per call and the dk op's speed-up over the fastest torch baseline. Each timing runs about `budget` seconds."""
    torch.set_num_threads(threads)
    for group, build in GROUPS.items():
        if only not in group:
            continue
        cases = build()
        best = interleaved_best(cases, rounds, budget)
        base = min((impl for impl in cases if not impl.startswith("dk.")), key=best.get)
        timings = ", ".join(f"{impl} {best[impl] * 1e6:.1f} us" for impl in cases)
        ours = next(impl for impl in cases if impl.startswith("dk."))
        print(f"[{threads} thr] {group}: {timings}; speed-up vs {base} {best[base] / best[ours]:.2f}x", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="run only the groups whose name contains this")
    args = parser.parse_args()
    main(args.rounds, threads=args.threads, only=args.only)
