"""CPU varlen attention: the "cpu" backend against torch baselines, fp32, forward and forward+backward.

Problems (full mode): "dpar" = 16 images with patch counts uniform in [60, 180], 12 heads, d = 64, causal (the
global transformer of DPAR); "token" = 16 x 256 tokens, same heads (token-level layers).
Baselines, timed in the same run: the per-sequence torch reference (backend "torch"), padded SDPA with a
key-padding + causal mask, a Python loop of per-sequence SDPA (is_causal=True), nested-jagged-tensor SDPA and
FlexAttention (compiled) with a document-causal block mask. A baseline that cannot run on CPU is skipped with its
error text as the reason. At the end a table prints every baseline's time over the cpu backend's time.
Run: pytest benchmarks/bench_attention.py --benchmark-only   (DPAR_BENCH_QUICK=1: tiny sizes, few rounds).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import dpar_kernels as dk

from .reporting import record

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
HEADS, HEAD_DIM = (2, 32) if QUICK else (12, 64)
SEQUENCES = 4 if QUICK else 16
DPAR_LENGTHS = (6, 20) if QUICK else (60, 180)
TOKEN_LENGTH = 24 if QUICK else 256
ROUNDS, WARMUP = (3, 1) if QUICK else (10, 2)

pytestmark = pytest.mark.skipif("cpu" not in dk.available_backends(torch.device("cpu")),
                                reason="the dpar_kernels._C extension is not built")


class Problem:
    """Packed q/k/v [T, H, d] with offsets, plus the padded / jagged / flex layouts of the same data."""

    def __init__(self, lengths: list[int]):
        generator = torch.Generator().manual_seed(0)
        self.lengths = lengths
        self.cu = dk.lengths_to_cu_seqlens(torch.tensor(lengths, dtype=torch.int32))
        self.max_len, self.total = max(lengths), sum(lengths)
        self.packed = [torch.randn(self.total, HEADS, HEAD_DIM, generator=generator) for _ in range(3)]
        self.grad_packed = torch.randn(self.total, HEADS, HEAD_DIM, generator=generator)
        self.pairs = dk.attended_pairs(self.cu, self.cu, True)

    def padded(self):
        """[B, H, Lmax, d] tensors and the bool mask [B, 1, Lmax, Lmax] (key is real and not in the future)."""
        tensors = []
        for t in self.packed + [self.grad_packed]:
            pad = t.new_zeros(len(self.lengths), self.max_len, HEADS, HEAD_DIM)
            for b, (start, end) in enumerate(zip(self.cu[:-1].tolist(), self.cu[1:].tolist())):
                pad[b, : end - start] = t[start:end]
            tensors.append(pad.transpose(1, 2).contiguous())
        keys = torch.arange(self.max_len)
        real_key = keys[None, :] < torch.tensor(self.lengths)[:, None]
        causal = keys[None, :] <= keys[:, None]
        return tensors, (real_key[:, None, :] & causal[None])[:, None]


def make_problem(name: str) -> Problem:
    if name == "dpar":
        low, high = DPAR_LENGTHS
        lengths = torch.randint(low, high + 1, (SEQUENCES,), generator=torch.Generator().manual_seed(1))
        return Problem(lengths.tolist())
    return Problem([TOKEN_LENGTH] * SEQUENCES)


PROBLEMS = {name: make_problem(name) for name in ("dpar", "token")}


# --------------------------------------------------------------------------------------- implementations
# Each builder returns (inputs, fn(*inputs) -> output, grad of the output, output -> packed [T, H, d]).

def build_varlen(p: Problem, backend: str):
    inputs = [t.clone() for t in p.packed]
    fn = lambda q, k, v: dk.varlen_attention(q, k, v, p.cu, p.cu, p.max_len, p.max_len, backend=backend)  # noqa
    return inputs, fn, p.grad_packed, lambda out: out


def build_padded(p: Problem):
    (q, k, v, grad), mask = p.padded()
    real = torch.arange(p.max_len)[None, :] < torch.tensor(p.lengths)[:, None]
    return ([q, k, v], lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), grad,
            lambda out: out.transpose(1, 2)[real])


def build_loop(p: Problem):
    bounds = list(zip(p.cu[:-1].tolist(), p.cu[1:].tolist()))

    def fn(q, k, v):
        outs = [F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True)
                for a, b in bounds]
        return torch.cat([o.transpose(0, 1) for o in outs])

    return [t.clone() for t in p.packed], fn, p.grad_packed, lambda out: out


def build_nested(p: Problem):
    offsets = p.cu.long()

    def fn(q, k, v):
        jagged = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*jagged, is_causal=True).transpose(1, 2).values()

    return [t.clone() for t in p.packed], fn, p.grad_packed, lambda out: out


def build_flex(p: Problem):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(torch.arange(len(p.lengths)), torch.tensor(p.lengths))

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, p.total, p.total, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        out = compiled(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)
        return out[0].transpose(0, 1)

    return [t.clone() for t in p.packed], fn, p.grad_packed, lambda out: out


IMPLEMENTATIONS = {
    "cpu": lambda p: build_varlen(p, "cpu"),
    "torch_reference": lambda p: build_varlen(p, "torch"),
    "sdpa_padded": build_padded,
    "sdpa_loop": build_loop,
    "sdpa_nested_jagged": build_nested,
    "flex_attention": build_flex,
}

def _runner(fn, inputs, grad, mode: str):
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run

    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
    return run


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_attention(benchmark, ratios, problem, mode, impl):
    p = PROBLEMS[problem]
    try:
        inputs, fn, grad, to_packed = IMPLEMENTATIONS[impl](p)
        with torch.no_grad():  # first call: compiles (flex), surfaces "not supported on CPU" errors
            out = to_packed(fn(*inputs))
        expected = dk.varlen_attention(*p.packed, p.cu, p.cu, p.max_len, p.max_len, backend="torch")
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # every contender computes the same
        for t in inputs:
            t.requires_grad_(mode == "forward_backward")
        run = _runner(fn, inputs, grad, mode)
        run()
    except (RuntimeError, NotImplementedError) as exc:  # a baseline that cannot run on CPU is reported, not failed
        if impl == "cpu":
            raise
        pytest.skip(f"{impl} does not run on CPU here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    flops = (4 if mode == "forward" else 14) * HEADS * HEAD_DIM * p.pairs
    group = f"attention-{problem}-{mode}"
    shape = (f"{len(p.lengths)} sequences of {min(p.lengths)}-{p.max_len} tokens ({p.total}), {HEADS} heads, "
             f"d={HEAD_DIM}, causal, fp32")
    record(benchmark, group, impl, shape=shape, baseline=impl != "cpu", backend="cpu" if impl == "cpu" else "",
           flops=flops, tokens=p.total)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP)
    ratios.add_time(group, impl, benchmark, baseline=impl != "cpu")
