"""Shared benchmark helpers.

QUICK (env DPAR_BENCH_QUICK=1): tiny sizes and few rounds, for CI. The `ratios` fixture collects timings and other
measurements per group; at the end of the session a table prints each timing as a speed-up over its group's
baseline, plus any extra values (memory, ...). Without the compiled extension dpar_kernels._C every dk kernel
benchmark would skip, so the session refuses to start unless DPAR_ALLOW_NO_EXTENSION=1. The benchmark JSON gets a
"dpar" entry: the mode, the machine (benchmarks/machine.py: CPU model, ISA path, threads, versions, commit) and its
load (os.getloadavg) at the start and the end of the session.
"""
import os

import pytest

from benchmarks.machine import machine_info
from dpar_kernels import _extension

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
_LOAD_AT_START = os.getloadavg()
_MACHINE = machine_info()  # at the start: the commit timed is the one checked out now


def pytest_configure(config):
    if not _extension.HAS_CPU_OPS and os.environ.get("DPAR_ALLOW_NO_EXTENSION") != "1":
        raise pytest.UsageError(
            "dpar_kernels._C is not loaded (see the warning above), so every dpar kernel benchmark would be skipped. "
            "Build it (`pip install --no-build-isolation -e .`, README Install) or set DPAR_ALLOW_NO_EXTENSION=1 to "
            "benchmark the baselines and Triton only.")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    command = " ".join(["DPAR_BENCH_QUICK=1"] * QUICK + ["pytest", *config.invocation_params.args])
    output_json["dpar"] = {"mode": "quick" if QUICK else "full", "command": command,
                           "loadavg_start": list(_LOAD_AT_START), "loadavg_end": list(os.getloadavg()),
                           "cpu_count": os.cpu_count(), "extension": _extension.HAS_CPU_OPS,
                           "machine": _MACHINE}


class RatioTable:
    """times[group][name] = (mean seconds, is_baseline); values: (group, name, value, unit) rows.

    Each non-baseline timing prints as a speed-up over the fastest baseline of its group (as benchmarks/report.py).
    """

    def __init__(self):
        self.times, self.values = {}, []

    def add_time(self, group: str, name: str, benchmark, baseline: bool = False) -> None:
        """Records the mean time of a finished pytest-benchmark run (nothing if benchmarking is disabled)."""
        if benchmark.stats is None:
            return
        self.times.setdefault(group, {})[name] = (benchmark.stats.stats.mean, baseline)

    def add_value(self, group: str, name: str, value: float, unit: str) -> None:
        self.values.append((group, name, value, unit))

    def lines(self) -> list[str]:
        out = []
        for group, times in self.times.items():
            baselines = {name: seconds for name, (seconds, is_base) in times.items() if is_base}
            best = min(baselines, key=baselines.get) if baselines else None
            for name, (seconds, is_base) in times.items():
                ratio = "" if is_base or best is None else f"{baselines[best] / seconds:8.2f}x vs {best}"
                out.append(f"{group:<28} {name:<34} {seconds * 1e3:12.3f} ms {ratio}")
        out += [f"{group:<28} {name:<34} {value:12.4g} {unit}" for group, name, value, unit in self.values]
        return out


_TABLE = RatioTable()


@pytest.fixture(scope="session")
def ratios() -> RatioTable:
    return _TABLE


def pytest_terminal_summary(terminalreporter):
    lines = _TABLE.lines()
    if lines:
        load = "/".join(f"{v:.1f}" for v in os.getloadavg())
        terminalreporter.section(f"dpar benchmark ratios ({'quick' if QUICK else 'full'} mode, load average {load} "
                                 f"on {os.cpu_count()} cores)")
        for line in lines:
            terminalreporter.write_line(line)
