"""CPU patch gather/scatter: the "cpu" backend against torch's own segment tools, timed in the same run.

Shape (full mode): 64 images x 256 tokens, DPAR patches of 1-4 tokens cut at 16-token rows, D = 768, fp32.
Run: pytest benchmarks/bench_gather_scatter.py --benchmark-only  (DPAR_BENCH_QUICK=1: tiny sizes, few rounds).
At the end, a table prints each baseline's time over the cpu backend's (>1 means the cpu backend is faster).
"""
import os

import pytest
import torch

import dpar_kernels as dk

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

RESULTS = {}  # group -> {impl: (median seconds, min seconds)}


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    yield
    if not RESULTS:
        return
    lines = [f"\npatch gather/scatter, {IMAGES}x{TOKENS} tokens, {PROBLEM.num_patches} patches, D={COLS}, fp32, "
             f"{torch.get_num_threads()} threads: speed-up = best baseline time / dpar_cpu time (median; min)"]
    for group, times in RESULTS.items():
        if "dpar_cpu" not in times or len(times) < 2:
            continue
        best_name, best = min(((n, t) for n, t in times.items() if n != "dpar_cpu"), key=lambda item: item[1][0])
        ours = times["dpar_cpu"]
        best_min = min(t[1] for n, t in times.items() if n != "dpar_cpu")
        lines.append(f"  {group:<28} dpar_cpu {ours[0] * 1e3:8.3f} ms  best baseline {best_name:<15} "
                     f"{best[0] * 1e3:8.3f} ms  speed-up {best[0] / ours[0]:5.2f}x; min-based {best_min / ours[1]:5.2f}x")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # print past pytest's output capture
        print("\n".join(lines))


def run(benchmark, group, name, fn):
    benchmark.group = group
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    if benchmark.stats is not None:
        stats = benchmark.stats.stats
        RESULTS.setdefault(group, {})[name] = (stats.median, stats.min)


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
def test_gather(benchmark, mode, impl, reduce):
    impls = GATHER_IMPLS[reduce]
    check_matches_dpar(impls, PROBLEM.x)
    fn = impls[impl]
    group = f"gather_{reduce}_{mode}"
    if mode == "forward":
        with torch.no_grad():
            run(benchmark, group, impl, lambda: fn(PROBLEM.x))
    else:
        run(benchmark, group, impl, forward_backward(fn, PROBLEM.x.clone().requires_grad_(True),
                                                      PROBLEM.grad_patches))


@pytest.mark.parametrize("impl", list(SCATTER_IMPLS))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_scatter(benchmark, mode, impl):
    check_matches_dpar(SCATTER_IMPLS, PROBLEM.y)
    fn = SCATTER_IMPLS[impl]
    group = f"scatter_{mode}"
    if mode == "forward":
        with torch.no_grad():
            run(benchmark, group, impl, lambda: fn(PROBLEM.y))
    else:
        run(benchmark, group, impl, forward_backward(fn, PROBLEM.y.clone().requires_grad_(True),
                                                      PROBLEM.grad_tokens))
