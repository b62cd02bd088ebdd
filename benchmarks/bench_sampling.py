"""Sampling throughput on CPU: DPAR (lockstep and out-of-step schedules) vs the LlamaGen baseline, same config
(width 256, 1+4+2 layers), same run.

    pytest benchmarks/bench_sampling.py --benchmark-only      (DPAR_BENCH_QUICK=1: tiny model, seconds)
    python -m benchmarks.bench_sampling [--repetitions N] [--compile] [--csv PATH]
                                                              (interleaved repetitions, best of each, threads 1)

Images/s at batch 1 and 16 (quick: 1 and 2) with KV caches (dk.kvcache_attention). DPAR settings:
"patch 2": threshold +inf, max patch size 2 (exactly half the global steps); "paper": entropy threshold for ~2x
fewer global steps, max patch 4; "patch 8": a raised threshold (~3x on max-4 patches), max patch 8 at inference.
Each DPAR setting runs under both schedules (dpar.model.schedule: "lockstep" and "out_of_step", the same tokens);
the script also runs a global-heavy config (1+8+2, its own LlamaGen of 11 layers) in the paper setting.
The entropy model is briefly trained on structured grids (benchmarks/workloads.py); the DPAR weights are random,
so patch statistics come from the tokens it samples. Each DPAR run records its global steps and local steps per
batch (step invocations, each over the rows that need it) and its global tokens per image.
``--compile`` also runs every case with compile=True (torch.compile of the per-token step and of DPAR's global
step): one untimed warm-up call per case compiles, then the compiled runs are interleaved with the eager ones.
The pytest benchmark times the eager path only (inductor's compile time would dominate CI).
"""
import argparse
import csv
import sys
import time
from dataclasses import replace

import pytest
import torch

import dpar
from benchmarks.machine import machine_label
from benchmarks.reporting import record
from benchmarks.workloads import (
    QUICK,
    SIZES,
    entropy_model_for_grid,
    kernel_backend,
    mean_time,
    model_config,
    new_model,
    threshold_for_reduction,
    train_entropy_model,
)
from dpar.model.dpar_sampler import DparSampler

BATCHES = (1, 2) if QUICK else (1, 16)
GRID = SIZES.sampling_grid


@pytest.fixture(scope="module")
def models():
    return build_models()


def build_models():
    """(DPAR, LlamaGen, entropy model, {setting: (threshold, max patch size)})."""
    dpar_model, _ = new_model("dpar", GRID)
    baseline, _ = new_model("baseline", GRID)
    entropy = entropy_model_for_grid(train_entropy_model(), GRID)
    tokens = dpar_model.eval().generate(torch.arange(4), entropy_model=entropy, threshold=float("inf"),
                                        max_patch_size=4, generator=torch.Generator().manual_seed(0))
    entropies = entropy.entropies(tokens)
    settings = {"patch 2": (float("inf"), 2),
                "paper": (threshold_for_reduction(entropies, GRID), 4),
                "patch 8": (threshold_for_reduction(entropies, GRID, reduction=3.0), 8)}
    return dpar_model, baseline.eval(), entropy, settings


SCHEDULES = ("lockstep", "out_of_step")
CASES = ["LlamaGen"] + [f"DPAR {setting} {schedule}" for setting in ("patch 2", "paper", "patch 8")
                        for schedule in SCHEDULES]


def _setting_and_schedule(impl: str) -> tuple[str, str]:
    setting, schedule = impl.removeprefix("DPAR ").rsplit(" ", 1)
    return setting, schedule


def sampler(models, impl: str, labels: torch.Tensor, compile: bool = False):
    """A closure sampling one batch with ``impl`` (one of CASES) -> tokens (LlamaGen) or the finished DparSampler
    (its tokens, step counts and patches)."""
    dpar_model, baseline, entropy, settings = models
    generator = torch.Generator().manual_seed(1)
    if impl == "LlamaGen":
        return lambda: baseline.generate(labels, generator=generator.manual_seed(1), compile=compile)
    setting, schedule = _setting_and_schedule(impl)
    threshold, max_patch = settings[setting]

    def run():
        dpar = DparSampler(dpar_model, labels.numel(), entropy_model=entropy, threshold=threshold,
                           max_patch_size=max_patch, schedule=schedule, compile=compile)
        dpar.load(None, labels, dpar.draw_noise(labels.numel(), generator.manual_seed(1)))
        dpar.run()
        return dpar
    return run


def step_counts(dpar: DparSampler) -> dict:
    """Global and local steps per batch, global tokens (class + patches) per image, of a finished sampler."""
    patches = dpar.images.patch_batch()
    return dict(global_steps=dpar.global_steps + 1, local_steps=dpar.local_steps,
                global_tokens_per_image=(patches.num_patches + dpar.batch) / dpar.batch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", CASES)
def test_sampling_throughput(benchmark, ratios, models, impl, batch):
    group = f"sampling batch {batch}"
    record(benchmark, group, impl, shape=f"batch {batch} of {GRID}x{GRID} tokens", baseline=impl == "LlamaGen",
           backend=kernel_backend(),
           quick=QUICK, grid=GRID, images=batch)
    if impl != "LlamaGen":
        threshold, max_patch = models[3][_setting_and_schedule(impl)[0]]
        benchmark.extra_info.update(threshold=threshold, max_patch_size=max_patch)
    fn = sampler(models, impl, torch.arange(batch) % 10)
    result = benchmark.pedantic(fn, rounds=2 if QUICK else 3, warmup_rounds=1, iterations=1)
    ratios.add_time(group, impl, benchmark, baseline=impl == "LlamaGen")
    if impl != "LlamaGen":
        steps = step_counts(result)["global_tokens_per_image"]
        benchmark.extra_info["global_steps_per_image"] = steps
        ratios.add_value(group, f"{impl} global tokens/image", steps, "steps")
    seconds = mean_time(benchmark)
    if seconds:
        benchmark.extra_info["images_per_s"] = batch / seconds
        ratios.add_value(group, f"{impl} images/s", batch / seconds, "images/s")


def global_heavy_models(models, global_layers: int = 8):
    """(DPAR, LlamaGen, entropy model, settings) with ``global_layers`` global layers (1+8+2 by default): the same
    entropy model and settings."""
    config = replace(model_config(GRID), global_layers=global_layers)
    torch.manual_seed(0)
    dpar_model = dpar.DPAR(config).eval()
    torch.manual_seed(0)
    return dpar_model, dpar.LlamaGenBaseline(config).eval(), models[2], models[3]


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_cases(models, cases: list[str], batch: int, repetitions: int, modes: dict) -> dict:
    """Interleaves ``cases`` x ``modes`` (one run of each per repetition) -> {(impl, mode): (best seconds, result)}."""
    labels = torch.arange(batch) % 10
    if any(modes.values()):
        for impl in cases:
            _timed(sampler(models, impl, labels, compile=True))  # compiles
    best = {}
    for _ in range(repetitions):
        for impl in cases:
            for mode, compile in modes.items():
                seconds, result = _timed(sampler(models, impl, labels, compile))
                if seconds < best.get((impl, mode), (float("inf"),))[0]:
                    best[impl, mode] = seconds, result
    return best


def main(argv=None) -> None:
    """Interleaves the cases (one run of each per repetition) and prints, per case, the best images/s as a ratio to
    LlamaGen's (same config, same mode), global and local steps per batch; --csv writes the rows."""
    parser = argparse.ArgumentParser(description="DPAR sampling schedules vs LlamaGen (CPU)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time compile=True")
    parser.add_argument("--batches", type=int, nargs="*", default=[16])
    parser.add_argument("--configs", nargs="*", default=["1+4+2", "1+8+2"], choices=["1+4+2", "1+8+2"])
    parser.add_argument("--settings", nargs="*", default=["patch 2", "paper", "patch 8"],
                        help="DPAR settings to run (LlamaGen always runs)")
    parser.add_argument("--csv", help="write the rows to this CSV (benchmarks/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = build_models()
    label = machine_label()
    print(label)
    modes = {"eager": False, **({"compiled": True} if args.compile else {})}
    configs = {"1+4+2": (models, CASES),
               "1+8+2": (global_heavy_models(models) if "1+8+2" in args.configs else None,
                         ["LlamaGen"] + [f"DPAR paper {s}" for s in SCHEDULES])}
    rows = []
    for batch in args.batches:
        for config in args.configs:
            config_models, cases = configs[config]
            cases = [c for c in cases if c == "LlamaGen" or _setting_and_schedule(c)[0] in args.settings]
            load = " ".join(open("/proc/loadavg").read().split()[:3])
            best = run_cases(config_models, cases, batch, args.repetitions, modes)
            for mode in modes:
                base = best["LlamaGen", mode][0]
                print(f"{config} batch {batch} {mode}: LlamaGen {batch / base:.3f} images/s (load {load})")
                for impl in cases:
                    seconds, result = best[impl, mode]
                    row = dict(config=config, batch=batch, mode=mode, implementation=impl,
                               images_per_s=round(batch / seconds, 3), ratio=round(base / seconds, 3))
                    if impl != "LlamaGen":
                        row.update(step_counts(result))
                        row["global_tokens_per_image"] = round(row["global_tokens_per_image"], 1)
                    else:
                        tokens = config_models[1].config.tokens_per_image
                        row.update(global_steps=tokens, local_steps=tokens, global_tokens_per_image=tokens)
                    command = "python -m benchmarks.bench_sampling " + " ".join(
                        f'"{a}"' if " " in a else a for a in (argv or sys.argv[1:]))
                    rows.append(dict(row, load=load, cpu=label, command=command))
                    print(f"  {impl:26s} {row['images_per_s']:7.3f} images/s {row['ratio']:5.2f}x, "
                          f"{row['global_steps']} global / {row['local_steps']} local steps per batch, "
                          f"{row['global_tokens_per_image']} global tokens per image")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        print("wrote", args.csv)


if __name__ == "__main__":
    main()
