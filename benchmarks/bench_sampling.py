"""Sampling throughput on CPU: DPAR vs the LlamaGen baseline, same config (width 256, 1+4+2 layers), same run.

    pytest benchmarks/bench_sampling.py --benchmark-only      (DPAR_BENCH_QUICK=1: tiny model, seconds)
    python -m benchmarks.bench_sampling [repetitions]         (interleaved repetitions, best of each, threads 1,
                                                               eager and generate(compile=True))

Images/s at batch 1 and 16 (quick: 1 and 2) with KV caches (dk.kvcache_attention). DPAR settings:
"patch 2": threshold +inf, max patch size 2 (exactly half the global steps); "paper": entropy threshold for ~2x
fewer global steps, max patch 4; "patch 8": a raised threshold (~3x on max-4 patches), max patch 8 at inference.
The entropy model is briefly trained on structured grids (benchmarks/workloads.py); the DPAR weights are random,
so patch statistics come from the tokens it samples. Each DPAR run records its global steps per image.
The script also runs every case with compile=True (torch.compile of the per-token step and of DPAR's global step):
one untimed warm-up call per case and batch compiles (its extra time over the eager run is reported), then the
compiled runs are interleaved with the eager ones. The pytest benchmark times the eager path only (inductor's
compile time would dominate CI).
"""
import sys
import time

import pytest
import torch

from benchmarks.machine import machine_label
from benchmarks.reporting import record
from benchmarks.workloads import (
    QUICK,
    SIZES,
    entropy_model_for_grid,
    kernel_backend,
    mean_time,
    new_model,
    threshold_for_reduction,
    train_entropy_model,
)

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


CASES = ["LlamaGen", "DPAR patch 2", "DPAR paper", "DPAR patch 8"]


def sampler(models, impl: str, labels: torch.Tensor, compile: bool = False):
    """A closure sampling one batch with ``impl`` (one of CASES); DPAR returns (tokens, PatchBatch)."""
    dpar_model, baseline, entropy, settings = models
    if impl == "LlamaGen":
        return lambda: baseline.generate(labels, generator=torch.Generator().manual_seed(1), compile=compile)
    threshold, max_patch = settings[impl.removeprefix("DPAR ")]
    return lambda: dpar_model.generate(labels, entropy_model=entropy, threshold=threshold, max_patch_size=max_patch,
                                       generator=torch.Generator().manual_seed(1), return_patches=True,
                                       compile=compile)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", CASES)
def test_sampling_throughput(benchmark, ratios, models, impl, batch):
    group = f"sampling batch {batch}"
    record(benchmark, group, impl, shape=f"batch {batch} of {GRID}x{GRID} tokens", baseline=impl == "LlamaGen",
           backend=kernel_backend(),
           quick=QUICK, grid=GRID, images=batch)
    if impl != "LlamaGen":
        threshold, max_patch = models[3][impl.removeprefix("DPAR ")]
        benchmark.extra_info.update(threshold=threshold, max_patch_size=max_patch)
    fn = sampler(models, impl, torch.arange(batch) % 10)
    result = benchmark.pedantic(fn, rounds=2 if QUICK else 3, warmup_rounds=1, iterations=1)
    ratios.add_time(group, impl, benchmark, baseline=impl == "LlamaGen")
    if impl != "LlamaGen":
        steps = (result[1].num_patches + batch) / batch
        benchmark.extra_info["global_steps_per_image"] = steps
        ratios.add_value(group, f"{impl} global steps/image", steps, "steps")
    seconds = mean_time(benchmark)
    if seconds:
        benchmark.extra_info["images_per_s"] = batch / seconds
        ratios.add_value(group, f"{impl} images/s", batch / seconds, "images/s")


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(repetitions: int) -> None:
    """Interleaves the cases, eager and compiled (one run of each per repetition), and prints the best images/s
    as ratios to eager LlamaGen, and compiled / eager per case."""
    torch.set_num_threads(1)
    models = build_models()
    print(machine_label())
    modes = {"eager": False, "compiled": True}
    for batch in reversed(BATCHES):
        labels = torch.arange(batch) % 10
        warmup = {impl: _timed(sampler(models, impl, labels, compile=True))[0] for impl in CASES}
        best, steps = {}, {}
        for _ in range(repetitions):
            for impl in CASES:
                for mode, compile in modes.items():
                    seconds, result = _timed(sampler(models, impl, labels, compile))
                    best[impl, mode] = min(best.get((impl, mode), float("inf")), seconds)
                    if impl != "LlamaGen":
                        steps[impl] = (result[1].num_patches + batch) / batch
        base = best["LlamaGen", "eager"]
        print(f"batch {batch}: eager LlamaGen {batch / base:.3f} images/s, "
              f"{models[0].config.tokens_per_image + 1} global steps/image")
        for impl in CASES:
            line = f"  {impl}: " + ", ".join(f"{mode} {batch / best[impl, mode]:.3f} images/s "
                                             f"({base / best[impl, mode]:.2f}x)" for mode in modes)
            compile_seconds = warmup[impl] - best[impl, "compiled"]
            line += f"; compiled/eager {best[impl, 'eager'] / best[impl, 'compiled']:.2f}x, " \
                    f"compile ~{compile_seconds:.0f} s"
            print(line + (f", {steps[impl]:.1f} global steps/image" if impl in steps else ""))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
