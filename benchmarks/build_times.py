"""Compile time of dpar_kernels._C per translation unit, and the wall time it implies at 2 and 16 parallel jobs.

    python setup.py build_ext --inplace                     # once: writes build/temp.*/build.ninja
    python -m benchmarks.build_times [--cpu] [--build-dir DIR]

Default: each unit's wall seconds from ninja's log of the last build (shared with its parallel neighbours and with
whatever else the machine ran). --cpu recompiles every unit one at a time (the commands of `ninja -t commands`) and
takes each one's CPU time (user + system), which a busy machine inflates far less than wall time: on an idle
machine with enough cores a unit's wall time is about its CPU time. The report lists every unit's seconds, their
sum, the longest unit (the critical path with enough cores: the units are independent) and the wall time of a
greedy schedule (units in build order, each job taking the next one) at 2 and 16 jobs. The link step (about a
second) is not included.
"""
import argparse
import glob
import os
import resource
import shlex
import subprocess

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


def cpu_times(build_dir: str) -> list[tuple[str, float]]:
    """(unit, CPU seconds) of recompiling every unit of build_dir's build.ninja, one at a time."""
    listing = subprocess.run(["ninja", "-C", build_dir, "-t", "commands"], check=True, capture_output=True, text=True)
    units = []
    for command in listing.stdout.splitlines():
        args = shlex.split(command)
        if "-c" not in args or "-o" not in args:
            continue  # the link
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, shell=True, check=True, cwd=build_dir, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        units.append((os.path.relpath(args[args.index("-o") + 1], build_dir), seconds))
    return units


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
    parser.add_argument("--cpu", action="store_true", help="recompile every unit alone and take its CPU time")
    args = parser.parse_args()
    build_dir = args.build_dir or next(iter(glob.glob(os.path.join(ROOT, "build", "temp.*"))), "")
    if not os.path.exists(os.path.join(build_dir, "build.ninja")):
        raise SystemExit("no build.ninja: run `python setup.py build_ext --inplace` first")
    units = cpu_times(build_dir) if args.cpu else read_log(os.path.join(build_dir, ".ninja_log"))
    durations = [seconds for _, seconds in units]
    for unit, seconds in sorted(units, key=lambda item: -item[1]):
        print(f"{seconds:8.1f} s  {unit}")
    kind = "CPU" if args.cpu else "wall (ninja log)"
    print(f"{kind}: {len(units)} units, {sum(durations):.1f} s in all; longest unit (critical path) "
          f"{max(durations):.1f} s; greedy schedule: {greedy_wall(durations, 2):.1f} s at 2 jobs, "
          f"{greedy_wall(durations, 16):.1f} s at 16")


if __name__ == "__main__":
    main()
