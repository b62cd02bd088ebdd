"""Speed of every C++ CPU op on each instruction-set path this CPU has, against its fastest torch baseline.

    python -m benchmarks.bench_isa [--rounds 3] [--threads 1] [--only SUBSTRING] [--csv PATH]

Each path (csrc/cpu/isa.h) runs in its own subprocess with DPAR_CPU_ISA=<path> (the path is fixed when
dpar_kernels._C loads). Inside it, the implementations of each case are interleaved for `rounds` rounds and the best
time per call is kept. Cases: the decode-size groups of benchmarks/bench_decode.py (class "decode") and the large
shapes of the attention, entropy and gather/scatter suites (class "large"): varlen_attention at the DPAR batch
(16 images of 60-180 tokens, H 12, d 64, causal) forward and forward+backward, token_entropy 1024 x 16384,
patch_gather max / mean and patch_scatter at 64 images x 256 tokens, D 768. ratio = best torch baseline time / dk
time (> 1: the C++ op is faster). Prints a table and writes the rows to a CSV (columns op, shape, class, isa,
backend, baseline, ratio, dk_us, baseline_us, threads, cpu_model, command).
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys

from benchmarks.timing import interleaved_best

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTROPY_ROWS, ENTROPY_VOCAB = 1024, 16384


def cpu_model() -> str:
    """The CPU's model name with its family / model numbers (e.g. "AMD EPYC family 25 model 1"), from /proc/cpuinfo."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    return f"{name} family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else name


# ------------------------------------------------------------------------------------------------ the cases
# Each builder returns {implementation name: fn()}; the dk implementation's name starts with "dk.".

def _decode_cases() -> dict:
    from . import bench_decode

    ops = {"decode attention": "kvcache_attention", "tiny patch_gather": "patch_gather",
           "tiny token_entropy": "token_entropy", "patch cross-attn": "varlen_attention",
           "one-query varlen": "varlen_attention", "train causal": "varlen_attention", "decode linear": "linear"}
    cases = {}
    for group, build in bench_decode.GROUPS.items():
        op = next(name for prefix, name in ops.items() if group.startswith(prefix))
        cases[(op, group, "decode")] = build
    return cases


def _attention_cases(backward: bool):
    from . import bench_attention as ba

    problem = ba.PROBLEMS["dpar"]
    mode = "forward_backward" if backward else "forward"
    impls = {"torch padded SDPA": ba.build_padded, "torch SDPA loop": ba.build_loop,
             "dk.varlen_attention (cpu)": lambda p: ba.build_varlen(p, "cpu")}
    cases = {}
    for name, build in impls.items():
        inputs, fn, grad, _ = build(problem)
        for t in inputs:
            t.requires_grad_(backward)
        cases[name] = ba._runner(fn, inputs, grad, mode)
    return cases


def _entropy_cases():
    import torch

    import dpar_kernels as dk

    from .bench_entropy import eager_entropy

    logits = torch.randn(ENTROPY_ROWS, ENTROPY_VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    return {"eager torch": lambda: eager_entropy(logits), "dk.token_entropy (cpu)":
            lambda: dk.token_entropy(logits, backend="cpu")}


def _gather_cases(reduce: str):
    from . import bench_gather_scatter as bg

    impls = bg.GATHER_IMPLS[reduce]
    return {("dk.patch_gather (cpu)" if name == "dpar_cpu" else name): (lambda fn=fn: fn(bg.PROBLEM.x))
            for name, fn in impls.items()}


def _scatter_cases():
    from . import bench_gather_scatter as bg

    return {("dk.patch_scatter (cpu)" if name == "dpar_cpu" else name): (lambda fn=fn: fn(bg.PROBLEM.y))
            for name, fn in bg.SCATTER_IMPLS.items()}


def _large_cases() -> dict:
    dpar = "DPAR batch 16 x 60-180 tokens H12 d64 causal"
    return {("varlen_attention", dpar + " fwd", "large"): lambda: _attention_cases(False),
            ("varlen_attention", dpar + " fwd+bwd", "large"): lambda: _attention_cases(True),
            ("token_entropy", f"{ENTROPY_ROWS}x{ENTROPY_VOCAB}", "large"): _entropy_cases,
            ("patch_gather", "max 64x256 tokens D768", "large"): lambda: _gather_cases("max"),
            ("patch_gather", "mean 64x256 tokens D768", "large"): lambda: _gather_cases("mean"),
            ("patch_scatter", "64x256 tokens D768", "large"): _scatter_cases}


def worker(rounds: int, threads: int, only: str, budget: float = 0.1) -> None:
    """Runs in the path's subprocess: one JSON line per case, {op, shape, class, isa, times (seconds per call)}."""
    import torch

    import dpar_kernels as dk

    torch.set_num_threads(threads)
    for (op, shape, size_class), build in {**_decode_cases(), **_large_cases()}.items():
        if only not in f"{op} {shape}":
            continue
        cases = build()
        best = interleaved_best(cases, rounds, budget)
        print(json.dumps({"op": op, "shape": shape, "class": size_class, "isa": dk.cpu_isa(), "times": best}),
              flush=True)


# ------------------------------------------------------------------------------------------------- the driver

def run_path(isa: str, rounds: int, threads: int, only: str) -> list[dict]:
    env = dict(os.environ, DPAR_CPU_ISA=isa,
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    args = [sys.executable, "-m", "benchmarks.bench_isa", "--worker", "--rounds", str(rounds), "--threads",
            str(threads), "--only", only]
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"DPAR_CPU_ISA={isa} worker failed:\n{result.stderr}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def rows_of(measurements: list[dict], threads: int, command: str) -> list[dict]:
    rows, model = [], cpu_model()
    for m in measurements:
        times = m["times"]
        ours = next(impl for impl in times if impl.startswith("dk."))
        base = min((impl for impl in times if not impl.startswith("dk.")), key=times.get)
        rows.append({"op": m["op"], "shape": m["shape"], "class": m["class"], "isa": m["isa"], "backend": "cpu",
                     "baseline": base, "ratio": round(times[base] / times[ours], 3),
                     "dk_us": round(times[ours] * 1e6, 1), "baseline_us": round(times[base] * 1e6, 1),
                     "threads": threads, "cpu_model": model, "command": command})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="run only the cases whose 'op shape' contains this")
    parser.add_argument("--isa", default="", help="comma-separated paths (default: every path this CPU has)")
    parser.add_argument("--csv", default="", help="write the rows here (default: print only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rounds, args.threads, args.only)
        return
    from dpar_kernels import _extension

    if not _extension.HAS_CPU_OPS:
        raise SystemExit("bench_isa needs the compiled extension dpar_kernels._C")
    paths = args.isa.split(",") if args.isa else _extension.EXTENSION.cpu_isa_supported()
    command = "python -m benchmarks.bench_isa " + " ".join(sys.argv[1:])
    rows = []
    for isa in paths:
        rows += rows_of(run_path(isa, args.rounds, args.threads, args.only), args.threads, command)
    print(f"{cpu_model()}, {args.threads} thread(s); ratio = best torch baseline time / dk time")
    for row in rows:
        print(f"{row['isa']:8} {row['op']:18} {row['shape'][:60]:60} {row['ratio']:6.2f}x  dk {row['dk_us']:10.1f} us"
              f"  vs {row['baseline']} {row['baseline_us']:.1f} us")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
