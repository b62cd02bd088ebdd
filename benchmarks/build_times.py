"""Compile time of dpar_kernels._C per translation unit, and the wall time it implies at 2 and 16 parallel jobs.

    python setup.py build_ext --inplace                     # once: writes build/temp.*/build.ninja
    python -m benchmarks.build_times [--rebuild] [--build-dir DIR]

--rebuild cleans the ninja build directory and recompiles every unit one at a time (ninja -j1), so each unit's
time in ninja's log is its own, not shared with a parallel neighbour. The report lists every unit's seconds from
.ninja_log, their sum, the longest unit (the critical path with enough cores: units are independent), and the
wall time of ninja's greedy schedule (units in build order, each job taking the next one) at 2 and 16 jobs; the
link step (tens of milliseconds to a second) is not in ninja's log.
"""
import argparse
import glob
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(path: str) -> list[tuple[str, float]]:
    """(unit, seconds) in build order from a .ninja_log (the latest entry of each output)."""
    units = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            start, end, _, output, _ = line.rstrip("\n").split("\t")
            units[output] = (int(start), (int(end) - int(start)) / 1000)
    ordered = sorted(units.items(), key=lambda item: item[1][0])
    return [(os.path.relpath(output, os.path.dirname(path)), seconds) for output, (_, seconds) in ordered]


def greedy_wall(durations: list[float], jobs: int) -> float:
    """Wall time of running the units in order on `jobs` workers, each taking the next unit when free."""
    free = [0.0] * jobs
    for seconds in durations:
        worker = free.index(min(free))
        free[worker] += seconds
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default="", help="the ninja directory (default: build/temp.* of this tree)")
    parser.add_argument("--rebuild", action="store_true", help="clean and recompile every unit with ninja -j1")
    args = parser.parse_args()
    build_dir = args.build_dir or next(iter(glob.glob(os.path.join(ROOT, "build", "temp.*"))), "")
    if not os.path.exists(os.path.join(build_dir, "build.ninja")):
        raise SystemExit("no build.ninja: run `python setup.py build_ext --inplace` first")
    if args.rebuild:
        subprocess.run(["ninja", "-C", build_dir, "-t", "clean"], check=True, capture_output=True)
        os.remove(os.path.join(build_dir, ".ninja_log"))
        start = time.perf_counter()
        subprocess.run(["ninja", "-C", build_dir, "-j1"], check=True, capture_output=True)
        print(f"ninja -j1: {time.perf_counter() - start:.1f} s wall")
    units = read_log(os.path.join(build_dir, ".ninja_log"))
    durations = [seconds for _, seconds in units]
    for unit, seconds in sorted(units, key=lambda item: -item[1]):
        print(f"{seconds:8.1f} s  {unit}")
    print(f"{len(units)} units, {sum(durations):.1f} s in all; longest unit (critical path) {max(durations):.1f} s; "
          f"greedy schedule: {greedy_wall(durations, 2):.1f} s at 2 jobs, {greedy_wall(durations, 16):.1f} s at 16")


if __name__ == "__main__":
    main()
