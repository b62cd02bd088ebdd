"""Scaling: tokens per image, global tokens, analytic FLOPs and training step time of DPAR vs the LlamaGen
baseline as the token grid grows (full: 16x16, 24x24, 32x32, 64x64; DPAR_BENCH_QUICK=1: 8x8, 16x16).

    pytest benchmarks/bench_scaling.py --benchmark-only

One entropy model is trained on structured grids of the e2e size and reused at every grid size (same weights,
relative RoPE); each grid's threshold gives ~2x fewer global tokens. Models as in bench_e2e (same width/depth).
"""
import pytest

from benchmarks.reporting import record
from benchmarks.workloads import (
    QUICK,
    SIZES,
    entropy_model_for_grid,
    kernel_backend,
    mean_time,
    new_model,
    train_entropy_model,
    training_batch,
    training_flops,
    training_step,
)

ROUNDS, WARMUP = (1, 1) if QUICK else (2, 1)
_TIMES: dict[tuple[int, str], float] = {}


@pytest.fixture(scope="module")
def batches():
    """grid -> Batch, built on first use."""
    trained, cache = train_entropy_model(), {}

    def get(grid: int):
        if grid not in cache:
            cache[grid] = training_batch(entropy_model_for_grid(trained, grid), SIZES.scaling_batch, grid, seed=2)
        return cache[grid]
    return get


@pytest.mark.parametrize("kind", ["baseline", "dpar"])  # baseline first: the DPAR row reports ratios to it
@pytest.mark.parametrize("grid", SIZES.scaling_grids)
def test_training_step_scaling(benchmark, grid, kind, batches):
    batch = batches(grid)
    images, tokens = batch.tokens.shape
    flops = training_flops(kind, grid, batch)
    record(benchmark, f"scaling {grid}x{grid} tokens", "DPAR" if kind == "dpar" else "LlamaGen baseline",
           shape=f"{images} image(s) of {grid}x{grid} tokens", baseline=kind == "baseline", flops=flops["total"],
           scaling="step time", size=tokens,
           tokens_per_image=tokens, global_tokens_per_image=flops["global_tokens"] / images, images=images,
           threshold=batch.threshold, backend=kernel_backend(), quick=QUICK)
    model, optimizer = new_model(kind, grid)
    benchmark.pedantic(training_step(model, optimizer, batch), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    _TIMES[(grid, kind)] = seconds = mean_time(benchmark)
    base_time = _TIMES.get((grid, "baseline"))
    if kind == "dpar" and seconds and base_time:
        base_flops = training_flops("baseline", grid, batch)
        flop_ratio, time_ratio = flops["total"] / base_flops["total"], seconds / base_time
        benchmark.extra_info.update(flop_ratio=flop_ratio, time_ratio=time_ratio)
        print(f"\n{grid}x{grid}: {tokens} tokens -> {flops['global_tokens'] / images:.0f} global tokens per image; "
              f"DPAR/LlamaGen FLOPs x{flop_ratio:.3f}, step time x{time_ratio:.3f}")
