"""The default backend is never slower than torch: for every op and shape class of benchmarks/cpu_choice.py,
backend=None (which follows dpar_kernels/cpu_choice.json on this ISA path) against the torch backend, interleaved in
one run, best of the rounds. Fails below MIN_RATIO (noise margin); CI runs it in quick mode. Where the table sends
the default to the torch backend, the test checks that the call resolves there (the same code: nothing to time)."""
import os

import pytest
import torch

from benchmarks.cpu_choice import workloads
from benchmarks.reporting import record
from benchmarks.timing import backend_times
from dpar_kernels import _ops

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
MIN_RATIO = 0.8
GROUP = "default backend vs torch backend"


def resolved_backends(run, monkeypatch) -> set[str]:
    """The backends the ops in ``run(None)`` resolve to."""
    chosen = set()
    resolve = _ops.resolve_backend

    def spy(*args, **kwargs):
        backend = resolve(*args, **kwargs)
        chosen.add(backend)
        return backend

    with monkeypatch.context() as patch:
        patch.setattr(_ops, "resolve_backend", spy)
        run(None)
    return chosen


@pytest.mark.parametrize("key", sorted(workloads(QUICK)))
def test_default_is_not_slower_than_torch(benchmark, key, monkeypatch):
    torch.manual_seed(0)
    run = workloads(QUICK)[key]()
    chosen = resolved_backends(run, monkeypatch)
    assert chosen, f"{key}: the workload made no dpar_kernels call"
    if chosen == {"torch"}:
        ratio = 1.0  # backend=None is the torch backend here
    else:
        ratio = 0.0
        for rounds in (5, 9) if QUICK else (7, 11):  # a second, longer run only below the bar (shared-CPU noise)
            best = backend_times(run, rounds, backends=(None, "torch"))
            ratio = max(ratio, best["torch"] / best[None])
            if ratio >= MIN_RATIO:
                break
    record(benchmark, GROUP, key, shape=key.split("/")[1], default=",".join(sorted(chosen)), ratio_to_torch=ratio)
    benchmark.pedantic(run, args=(None,), rounds=3 if QUICK else 10, warmup_rounds=1)
    assert ratio >= MIN_RATIO, f"{key}: backend=None is {ratio:.2f}x the torch backend (below {MIN_RATIO})"
