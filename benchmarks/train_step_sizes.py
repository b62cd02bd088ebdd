"""DPAR's training step against the LlamaGen baseline's as the model and batch grow, on the demo's data shape.

    python -m benchmarks.train_step_sizes [--configs B,W,H,T ...] [--rounds N] [--csv PATH]

Each config (batch B, width W, heads H, torch threads T) builds the demo's models (preset tiny-global: 1/8/1 layers
for DPAR, 10 for the baseline) on 8x8 token grids of a 256-token vocabulary, DPAR on static patches of 36 per image
(the demo's 1.8x reduction), and times full optimizer steps (loss, backward, clipping, AdamW) of both models
interleaved, best of ``--rounds``. The FLOP ratio is torch.utils.flop_counter's count of one step of each. A
"time / FLOPs" ratio below 1 means DPAR's step costs less time than its share of the baseline's FLOPs: at equal
training FLOPs it trains in less wall time.
"""
import argparse
import csv
import dataclasses
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import machine_info
from benchmarks.timing import interleaved_best
from dpar.model.config import get_config
from dpar.model.patcher import PatchBatch
from dpar.pipeline import train
from dpar.pipeline.builders import build_model
from dpar_kernels.patching import static_patch_lengths

GRID, VOCAB, CLASSES, PATCHES_PER_IMAGE = 8, 256, 19, 36
DEFAULT_CONFIGS = ("16,64,2,2", "16,64,2,1", "32,64,2,2", "64,64,2,2", "32,96,3,2", "64,96,3,2", "32,128,2,2",
                   "64,128,2,2")
FIELDS = ("batch", "width", "heads", "threads", "baseline_ms", "dpar_ms", "flop_ratio", "time_ratio",
          "time_per_flop_ratio", "cpu_model", "isa", "commit", "command")


def step_function(kind: str, config, tokens: torch.Tensor, labels: torch.Tensor, patches: PatchBatch | None):
    """A fresh ``kind`` model's optimizer step on one fixed batch (the demo's AdamW settings), as a closure."""
    torch.manual_seed(0)
    model = build_model(kind, dataclasses.asdict(config))
    optimizer = train.make_optimizer(model, 2e-3, (0.9, 0.95), 0.05)

    def step() -> None:
        loss = model.loss(tokens, labels, patches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(batch: int, width: int, heads: int, threads: int, rounds: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        config = get_config("tiny-global", vocab_size=VOCAB, num_classes=CLASSES, grid_height=GRID, grid_width=GRID,
                            width=width, num_heads=heads, num_kv_heads=heads)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (batch, GRID * GRID), generator=generator)
        labels = torch.randint(0, CLASSES, (batch,), generator=generator)
        lengths, cu = static_patch_lengths(batch, grid_height=GRID, grid_width=GRID,
                                           patches_per_image=PATCHES_PER_IMAGE)
        patches = PatchBatch.from_lengths(lengths, cu, GRID)
        steps = {"baseline": step_function("baseline", config, tokens, labels, None),
                 "dpar": step_function("dpar", config, tokens, labels, patches)}
        flops = {kind: step_flops(step) for kind, step in steps.items()}  # also the untimed first step
        best = interleaved_best(steps, rounds, budget=0.5)
    finally:
        torch.set_num_threads(previous)
    flop_ratio, time_ratio = flops["dpar"] / flops["baseline"], best["dpar"] / best["baseline"]
    return {"batch": batch, "width": width, "heads": heads, "threads": threads,
            "baseline_ms": round(best["baseline"] * 1e3, 2), "dpar_ms": round(best["dpar"] * 1e3, 2),
            "flop_ratio": round(flop_ratio, 4), "time_ratio": round(time_ratio, 4),
            "time_per_flop_ratio": round(time_ratio / flop_ratio, 4)}


def parse_config(text: str) -> tuple[int, int, int, int]:
    try:
        batch, width, heads, threads = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a config is B,W,H,T (four integers), got {text!r}") from None
    if min(batch, width, heads, threads) < 1 or width % heads:
        raise argparse.ArgumentTypeError(f"config {text!r}: positive integers with W a multiple of H")
    return batch, width, heads, threads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        help="batch,width,heads,threads per config")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best of)")
    parser.add_argument("--csv", help="write the rows here")
    args = parser.parse_args(argv)
    info = machine_info()
    command = " ".join(["python -m benchmarks.train_step_sizes", *(argv if argv is not None else sys.argv[1:])])
    print(f"{info['cpu_model']}, ISA path {info['isa']}, commit {info['commit']}", flush=True)
    rows = []
    for batch, width, heads, threads in args.configs:
        row = {**measure(batch, width, heads, threads, args.rounds), "cpu_model": info["cpu_model"],
               "isa": info["isa"], "commit": info["commit"], "command": command}
        rows.append(row)
        print(f"B{batch:<3} W{width:<4} H{heads} T{threads}: baseline {row['baseline_ms']:8.1f} ms, DPAR "
              f"{row['dpar_ms']:8.1f} ms; FLOPs {row['flop_ratio']:.3f}x, time {row['time_ratio']:.3f}x, time / FLOPs "
              f"{row['time_per_flop_ratio']:.3f}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
