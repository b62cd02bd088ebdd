"""How a benchmark labels itself for benchmarks/report.py."""


def record(benchmark, group: str, impl: str, *, baseline: bool = False, **info) -> None:
    """Sets the pytest-benchmark group and the extra_info keys the report reads (impl, baseline, flops, ...)."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, baseline=baseline, **info)
