"""CPU patch gather/scatter: the "cpu" backend against torch's own segment tools, timed in the same run.

Shape (full mode): 64 images x 256 tokens, DPAR patches of 1-4 tokens cut at 16-token rows, D = 768, fp32.
Run: pytest benchmarks/bench_gather_scatter.py --benchmark-only  (DPAR_BENCH_QUICK=1: tiny sizes, few rounds).
The shared ratio table (benchmarks/conftest.py) prints each cpu-backend time as a speed-up over the fastest baseline.
"""
import os

import pytest
import torch

import dpar_kernels as dk

from .reporting import record

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
IMAGES, TOKENS, ROW_WIDTH, MAX_PATCH, COLS = (4, 32, 16, 4, 32) if QUICK else (64, 256, 16, 4, 768)
ROUNDS, WARMUP = (3, 1) if QUICK else (30, 3)

pytestmark = pytest.mark.skipif("cpu" not in dk.available_backends(torch.device("cpu")),
                                reason="the dpar_kernels._C extension is not built")


class Problem:
    """A packed batch: x [T, D] tokens, patch offsets and the index tensors the baselines need."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        entropy = torch.rand(IMAGES, TOKENS, generator=generator) * 10
        lengths, _ = dk.entropy_patch_lengths(entropy, threshold=6.0, max_patch_size=MAX_PATCH, row_width=ROW_WIDTH)
        self.lengths = lengths
        self.cu = dk.lengths_to_cu_seqlens(lengths)
        self.total = IMAGES * TOKENS
        self.ids = dk.patch_ids(lengths, self.total).long()
        self.num_patches = lengths.numel()
        self.x = torch.randn(self.total, COLS, generator=generator)
        self.y = torch.randn(self.num_patches, COLS, generator=generator)
        self.grad_patches = torch.randn(self.num_patches, COLS, generator=generator)
        self.grad_tokens = torch.randn(self.total, COLS, generator=generator)


PROBLEM = Problem()
SHAPE = (f"{IMAGES}x{TOKENS} tokens in {PROBLEM.num_patches} patches of 1-{MAX_PATCH} (rows of {ROW_WIDTH}), "
         f"D={COLS}, fp32")


def gather_index_add(x, reduce):
    out = x.new_zeros(PROBLEM.num_patches, x.shape[1]).index_add(0, PROBLEM.ids, x)
    return out / PROBLEM.lengths.clamp(min=1).to(x.dtype)[:, None] if reduce == "mean" else out


def gather_scatter_reduce(x, reduce):
    index = PROBLEM.ids[:, None].expand_as(x)
    torch_reduce = "amax" if reduce == "max" else reduce
    return x.new_zeros(PROBLEM.num_patches, x.shape[1]).scatter_reduce(0, index, x, torch_reduce,
                                                                       include_self=False)


def gather_segment_reduce(x, reduce):
    return torch.segment_reduce(x, reduce, lengths=PROBLEM.lengths, axis=0, unsafe=True)


GATHER_IMPLS = {
    "max": {"dpar_cpu": lambda x: dk.patch_gather(x, PROBLEM.cu, reduce="max", backend="cpu"),
            "scatter_reduce": lambda x: gather_scatter_reduce(x, "max"),
            "segment_reduce": lambda x: gather_segment_reduce(x, "max")},
    "mean": {"dpar_cpu": lambda x: dk.patch_gather(x, PROBLEM.cu, reduce="mean", backend="cpu"),
             "index_add": lambda x: gather_index_add(x, "mean"),
             "scatter_reduce": lambda x: gather_scatter_reduce(x, "mean"),
             "segment_reduce": lambda x: gather_segment_reduce(x, "mean")},
}
SCATTER_IMPLS = {
    "dpar_cpu": lambda y: dk.patch_scatter(y, PROBLEM.cu, total_tokens=PROBLEM.total, backend="cpu"),
    "index_select": lambda y: y.index_select(0, PROBLEM.ids),
    "repeat_interleave": lambda y: y.repeat_interleave(PROBLEM.lengths.long(), dim=0, output_size=PROBLEM.total),
}

def run(benchmark, ratios, group, name, fn):
    ours = name == "dpar_cpu"
    record(benchmark, group, name, shape=SHAPE, baseline=not ours, backend="cpu" if ours else "")
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    ratios.add_time(group, name, benchmark, baseline=name != "dpar_cpu")


def forward_backward(impl, leaf, grad):
    def step():
        leaf.grad = None
        impl(leaf).backward(grad)
    return step


def check_matches_dpar(impls, arg):
    expected = impls["dpar_cpu"](arg)
    for fn in impls.values():
        torch.testing.assert_close(fn(arg), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce,impl", [(r, i) for r, impls in GATHER_IMPLS.items() for i in impls])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_gather(benchmark, ratios, mode, impl, reduce):
    impls = GATHER_IMPLS[reduce]
    check_matches_dpar(impls, PROBLEM.x)
    fn = impls[impl]
    group = f"gather_{reduce}_{mode}"
    if mode == "forward":
        with torch.no_grad():
            run(benchmark, ratios, group, impl, lambda: fn(PROBLEM.x))
    else:
        run(benchmark, ratios, group, impl, forward_backward(fn, PROBLEM.x.clone().requires_grad_(True),
                                                      PROBLEM.grad_patches))


@pytest.mark.parametrize("impl", list(SCATTER_IMPLS))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_scatter(benchmark, ratios, mode, impl):
    check_matches_dpar(SCATTER_IMPLS, PROBLEM.y)
    fn = SCATTER_IMPLS[impl]
    group = f"scatter_{mode}"
    if mode == "forward":
        with torch.no_grad():
            run(benchmark, ratios, group, impl, lambda: fn(PROBLEM.y))
    else:
        run(benchmark, ratios, group, impl, forward_backward(fn, PROBLEM.y.clone().requires_grad_(True),
                                                      PROBLEM.grad_tokens))
