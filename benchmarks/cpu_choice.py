"""Measures which backend=None choice is faster on this CPU, per op and shape class: the C++ kernel (backend="cpu")
or the torch backend, on the ISA path the kernels run here (dk.cpu_isa(); DPAR_CPU_ISA=avx2|default selects a lower
one). Each workload's two backends run interleaved, best of --rounds, --repeats times; the ratio is torch time /
cpu time, and the worst of the repeats decides.

    python -m benchmarks.cpu_choice                 # print the table for this machine
    python -m benchmarks.cpu_choice --write         # also record it in dpar_kernels/cpu_choice.json
    DPAR_CPU_ISA=default python -m benchmarks.cpu_choice --write    # the baseline x86-64 path of this machine

backend=None follows dpar_kernels/cpu_choice.json on CPU tensors: "cpu" only where the ratio is at least MARGIN.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

import dpar_kernels as dk
from benchmarks.timing import backend_times
from dpar_kernels import _cpu_choice

MARGIN = 1.05  # the kernel must beat the torch backend by this factor to become the default (noise)


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    return dk.lengths_to_cu_seqlens(lengths.to(torch.int32))


def _attention(lengths_q, lengths_k, heads: int, head_dim: int, train: bool) -> Callable[[str], None]:
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    q = torch.randn(int(cu_q[-1]), heads, head_dim, requires_grad=train)
    k, v = (torch.randn(int(cu_k[-1]), heads, head_dim, requires_grad=train) for _ in range(2))
    max_q, max_k = int(lengths_q.max()), int(lengths_k.max())

    def run(backend: str) -> None:
        with torch.set_grad_enabled(train):
            out = dk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=max_q > 1, backend=backend)
            if train:
                out.sum().backward()

    return run


def _dpar_batch(images: int):
    return torch.randint(60, 181, (images,))


def _cross_attention(patches: int):
    return torch.ones(patches, dtype=torch.long), torch.randint(1, 5, (patches,))


def _gather(tokens: int, dim: int, train: bool, scatter: bool) -> Callable[[str], None]:
    lengths = torch.randint(1, 5, (tokens,))
    lengths = lengths[: int((lengths.cumsum(0) <= tokens).sum())]
    cu = _cu(lengths)
    x = torch.randn(int(cu[-1]) if not scatter else lengths.numel(), dim, requires_grad=train)

    def run(backend: str) -> None:
        with torch.set_grad_enabled(train):
            if scatter:
                out = dk.patch_scatter(x, cu, total_tokens=int(cu[-1]), backend=backend)
            else:
                out = dk.patch_gather(x, cu, reduce="max", backend=backend)
            if train:
                out.sum().backward()

    return run


def _kvcache(batch: int, heads: int, length: int, head_dim: int) -> Callable[[str], None]:
    k_cache, v_cache = (torch.randn(batch, length + 1, heads, head_dim) for _ in range(2))
    q, new = torch.randn(batch, 1, heads, head_dim), torch.randn(batch, 1, heads, head_dim)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    return lambda backend: dk.kvcache_attention(q, k_cache, v_cache, lengths, new, new, backend=backend)


def _token_entropy(rows: int, vocab: int) -> Callable[[str], None]:
    logits = torch.randn(rows, vocab) * 3
    return lambda backend: dk.token_entropy(logits, backend=backend)


def _linear_entropy(rows: int, dim: int, vocab: int) -> Callable[[str], None]:
    hidden, weight = torch.randn(rows, dim), torch.randn(vocab, dim) / dim ** 0.5
    return lambda backend: dk.linear_entropy(hidden, weight, backend=backend)


def _linear(rows: int, dim: int, out: int) -> Callable[[str], None]:
    x, weights = torch.randn(rows, dim), [torch.randn(out, dim) for _ in range(16)]  # 16 weights: from memory
    state = {"i": 0}

    def run(backend: str) -> None:
        state["i"] = (state["i"] + 1) % len(weights)
        with torch.no_grad():
            dk.linear(x, weights[state["i"]], backend=backend)

    return run


def workloads(quick: bool) -> dict[str, Callable[[], Callable[[str], None]]]:
    """"op/shape_class" -> a builder of its representative call (the shapes of the DPAR model and sampler)."""
    images = 4 if quick else 16
    return {
        "varlen_attention/long": lambda: _attention(*(2 * [_dpar_batch(images)]), 12, 64, False),
        "varlen_attention/train-long": lambda: _attention(*(2 * [_dpar_batch(images)]), 12, 64, True),
        "varlen_attention/short": lambda: _attention(*_cross_attention(128 if quick else 512), 12, 64, False),
        "varlen_attention/train-short": lambda: _attention(*_cross_attention(128 if quick else 512), 12, 64, True),
        "kvcache_attention/decode": lambda: _kvcache(16, 4, 256, 64),
        "token_entropy/small": lambda: _token_entropy(16, 512),
        "token_entropy/large": lambda: _token_entropy(256 if quick else 4096, 16384),
        "linear_entropy/decode": lambda: _linear_entropy(16, 256, 4096),
        "linear_entropy/large": lambda: _linear_entropy(256 if quick else 1024, 256, 4096),
        "patch_gather/small": lambda: _gather(32, 64, False, False),
        "patch_gather/large": lambda: _gather(16 * 256, 768, False, False),
        "patch_gather/train": lambda: _gather(16 * 256, 768, True, False),
        "patch_scatter/small": lambda: _gather(32, 64, False, True),
        "patch_scatter/large": lambda: _gather(16 * 256, 768, False, True),
        "patch_scatter/train": lambda: _gather(16 * 256, 768, True, True),
        "linear/1-row": lambda: _linear(1, 256, 768),
        "linear/rows": lambda: _linear(16, 256, 768),
    }


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown")
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in open("/proc/cpuinfo") if ":" in line)}
    return {"cpu": f"{model} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})",
            "isa": _cpu_choice.cpu_isa(), "threads": torch.get_num_threads()}


def measure(quick: bool, rounds: int, repeats: int, only: str | None = None) -> dict[str, dict]:
    """Each workload measured ``repeats`` times (separate interleaved best-of runs); the kernel becomes the default
    only when its worst ratio still reaches MARGIN (memory-bound shapes swing between runs on a shared VM)."""
    entries = {}
    for key, build in workloads(quick).items():
        if only and not key.startswith(only):
            continue
        torch.manual_seed(0)
        run = build()
        times = [backend_times(run, rounds) for _ in range(repeats)]
        ratios = sorted(best["torch"] / best["cpu"] for best in times)
        entries[key] = {"backend": "cpu" if ratios[0] >= MARGIN else "torch", "ratio": round(ratios[0], 3),
                        "ratios": [round(r, 3) for r in ratios]}
        print(f"{key:<30} cpu {min(t['cpu'] for t in times) * 1e3:10.3f} ms  "
              f"torch {min(t['torch'] for t in times) * 1e3:10.3f} ms  "
              f"ratios {' '.join(f'{r:.2f}' for r in ratios)} -> {entries[key]['backend']}", flush=True)
    return entries


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="record the result in dpar_kernels/cpu_choice.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="independent measurements; the worst ratio decides")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a rough table in seconds)")
    parser.add_argument("--only", help="only the workloads whose key starts with this")
    args = parser.parse_args(argv)
    info = machine()
    if info["isa"] == "none":
        sys.exit("error: dpar_kernels._C is not built: there is no C++ kernel to measure")
    print(f"{info['cpu']}, ISA path {info['isa']}, {info['threads']} threads", flush=True)
    _cpu_choice.set_table({})  # measure, not follow, the shipped choice
    entries = measure(args.quick, args.rounds, args.repeats, args.only)
    if not args.write:
        return
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    stamp = {"cpu": info["cpu"], "threads": info["threads"], "commit": commit,
             "date": datetime.date.today().isoformat(),
             "command": " ".join(["python -m benchmarks.cpu_choice", *(argv if argv is not None else sys.argv[1:])])
             + (f" (DPAR_CPU_ISA={os.environ['DPAR_CPU_ISA']})" if os.environ.get("DPAR_CPU_ISA") else "")}
    path = _cpu_choice.TABLE_PATH
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    choices = data.setdefault("choices", {}).setdefault(info["isa"], {})
    for key, entry in entries.items():
        choices[key] = {**entry, **stamp}
    data["about"] = (f"backend=None on CPU tensors per ISA path and op/shape class: 'cpu' where the C++ kernel was "
                     f"measured >= {MARGIN:.2f}x the torch backend in each of --repeats runs ('ratio': the worst); "
                     f"written by python -m benchmarks.cpu_choice --write")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(entries)} entries for {info['isa']} to {path}")


if __name__ == "__main__":
    main()
