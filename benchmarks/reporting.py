"""How a benchmark labels itself for benchmarks/report.py."""


def record(benchmark, group: str, impl: str, *, shape: str, baseline: bool = False, **info) -> None:
    """Sets the pytest-benchmark group and the extra_info keys the report reads: impl (the implementation or
    backend), shape (the workload in words), baseline, and optional flops, backend, scaling/size, ..."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, shape=shape, baseline=baseline, **info)
