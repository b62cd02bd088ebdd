"""The default backend is never slower than torch: for every op and shape class of benchmarks/cpu_choice.py,
backend=None (which follows dpar_kernels/cpu_choice.json on this ISA path) against the torch backend, interleaved in
one run, best of the rounds. Fails below MIN_RATIO (noise margin); CI runs it in quick mode."""
import os

import pytest
import torch

from benchmarks.cpu_choice import workloads
from benchmarks.reporting import record
from benchmarks.timing import backend_times

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
MIN_RATIO = 0.8
GROUP = "default backend vs torch backend"


@pytest.mark.parametrize("key", sorted(workloads(QUICK)))
def test_default_is_not_slower_than_torch(benchmark, key):
    torch.manual_seed(0)
    run = workloads(QUICK)[key]()
    ratio = 0.0
    for _ in range(2):  # a second interleaved run only when the first falls below the bar (noise on a shared CPU)
        best = backend_times(run, 5 if QUICK else 7, backends=(None, "torch"))
        ratio = max(ratio, best["torch"] / best[None])
        if ratio >= MIN_RATIO:
            break
    record(benchmark, GROUP, key, shape=key.split("/")[1], ratio_to_torch=ratio)
    benchmark.pedantic(run, args=(None,), rounds=3 if QUICK else 10, warmup_rounds=1)
    assert ratio >= MIN_RATIO, f"{key}: backend=None is {ratio:.2f}x the torch backend (below {MIN_RATIO})"
