"""Interleaved best-of timing for CPU ratios on a noisy machine (bench_decode, bench_isa, cpu_choice)."""
import time
from collections.abc import Callable


def _time_once(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-6)


def interleaved_best(cases: dict, rounds: int, budget: float) -> dict:
    """{name: fn} -> {name: best seconds per call}: the cases run in turn every round (so load drifts hit them
    alike), each timing repeating its call for about ``budget`` seconds (decode-size calls are microseconds)."""
    calls = {name: max(1, int(budget / _time_once(fn))) for name, fn in cases.items()}
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name])
    return best


def backend_times(run: Callable, rounds: int, backends=("cpu", "torch"), budget: float = 0.02) -> dict:
    """interleaved_best over ``run(backend)`` for each backend."""
    return interleaved_best({b: (lambda b=b: run(b)) for b in backends}, rounds, budget)
