"""Cost model of DPAR's sampling schedules: measured step costs, simulated schedules, projected ratios.

    python -m benchmarks.sampling_cost_model [--csv PATH]

1. Measures, at bench_sampling's config (width 256, 1+4+2, one thread), the cost of one local step (decoder +
   sampling + encoder + entropy model) and of one global step (patch embedding + global stack) over n = 1, 2, 4, 8,
   16 images, as the CPU sampler runs them (dpar_sampler: only the rows they serve), and of one LlamaGen step over
   16 images, mid-image (128 tokens cached), interleaved best-of.
2. Replays the patches the bench samples at batch 16 (schedule.simulate_schedule) under lockstep and WaitFraction
   policies: predicted time = the sum over the steps of the measured cost at their image count (interpolated
   linearly between the measured counts), as a ratio to LlamaGen's T steps. The policy with the best predicted
   ratio is the one to choose on this machine (schedule.OUT_OF_STEP[True]).
3. Projects the same schedules to DPAR-B/L/XL depth splits (1/8/3, 1/19/4, 1/30/5) at batch 16/64/256 with CFG
   (2 rows per image) on a GPU roofline (bf16, H200: 4.8 TB/s, 990 dense TFLOP/s; a step costs the larger of its
   weight + KV-cache bytes over bandwidth and its FLOPs over peak; the entropy model, width 512 x 8 layers, is part
   of the local step; every step computes every row, as the GPU sampler does), over the patches the bench's entropy
   model gives structured 16 x 16 grids at a 2x reduction (max patch 4). A projection, not a measurement
   (schedule.OUT_OF_STEP[False]).
"""
from __future__ import annotations

import argparse
import csv
import functools
import os

import torch

from benchmarks import bench_sampling
from benchmarks.machine import machine_label
from benchmarks.timing import interleaved_best
from benchmarks.workloads import SIZES, structured_grids, threshold_for_reduction
from dpar.model import generation
from dpar.model.dpar_sampler import DparSampler
from dpar.model.schedule import LOCKSTEP, WaitFraction, simulate_schedule
from dpar_kernels import entropy_patch_lengths

BATCH = 16
IMAGES = (1, 2, 4, 8, 16)  # image counts at which the CPU step costs are measured
POLICIES = {"lockstep": LOCKSTEP, **{f"wait {f:g}": WaitFraction(f) for f in (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)}}
DEPTHS = {"B": (768, 1, 8, 3), "L": (1024, 1, 19, 4), "XL": (1280, 1, 30, 5)}  # width, encoder, global, decoder
GPU = dict(bandwidth=4.8e12, flops=990e12, bytes_per_value=2)


def measured_costs(models) -> dict:
    """Seconds per step, mid-image: {("local" | "global", n images): s} and "base" (LlamaGen, 16 images)."""
    dpar_model, baseline, entropy, settings = models
    labels = torch.arange(BATCH) % 10
    threshold, max_patch = settings["paper"]
    sampler = DparSampler(dpar_model, BATCH, entropy_model=entropy, threshold=threshold, max_patch_size=max_patch,
                          schedule="lockstep")
    if not sampler.gathered:
        raise RuntimeError("the cost model measures the CPU sampler's gathered steps")
    sampler.load(None, labels, sampler.draw_noise(BATCH, torch.Generator().manual_seed(0)))
    while int(sampler.images.position.min()) < dpar_model.config.tokens_per_image // 2:
        sampler.step()
    caches = [sampler.encoder_cache, sampler.global_cache, sampler.decoder_cache, sampler.entropy_cache]
    images = sampler.images
    saved = [c.lengths.clone() for c in caches]
    saved_images = [images.position.clone(), images.start.clone(), images.waiting.clone()]

    def restore():
        for c, lengths in zip(caches, saved):
            c.lengths.copy_(lengths)
        for kept, now in zip(saved_images, (images.position, images.start, images.waiting)):
            now.copy_(kept)

    def local(n):
        slots = torch.arange(n)
        sampler._local_step(dpar_model, sampler.decoder_cache, sampler.encoder_cache, entropy, sampler.entropy_cache,
                            images, sampler.previous, sampler.condition, sampler.noise, sampler.tokens,
                            sampler.states, sampler.keys_values, slots, BATCH, 1.0, sampler.sampling)
        restore()

    def global_step(n):
        images.start.copy_(images.position - 2)
        sampler._global_step(dpar_model, sampler.global_cache, sampler.condition, sampler.states,
                             sampler.keys_values, images, max_patch, torch.arange(n), BATCH)
        restore()

    base_cache = generation._cache(baseline, baseline.config.total_layers, BATCH, baseline.config.tokens_per_image)
    base_cache.lengths.fill_(baseline.config.tokens_per_image // 2)
    inputs = baseline.token_embed(labels)
    noise = generation._noise(baseline, BATCH, 1.0, torch.Generator().manual_seed(0))

    def base():
        generation._baseline_step(baseline, base_cache, inputs, noise, BATCH, 1.0, dict(temperature=1.0))
        base_cache.lengths.fill_(baseline.config.tokens_per_image // 2)

    cases = {"base": base, **{("local", n): functools.partial(local, n) for n in IMAGES},
             **{("global", n): functools.partial(global_step, n) for n in IMAGES}}
    with torch.no_grad():
        return interleaved_best(cases, rounds=5, budget=0.2)


def step_cost(costs: dict, kind: str, images: int) -> float:
    """Seconds of a ``kind`` step over ``images`` images: linear between the measured counts."""
    low = max(n for n in IMAGES if n <= images)
    high = min(n for n in IMAGES if n >= images)
    if low == high:
        return costs[kind, low]
    weight = (images - low) / (high - low)
    return (1 - weight) * costs[kind, low] + weight * costs[kind, high]


def sampled_patches(models) -> dict:
    """{setting: per-image patch lengths} of a batch the bench samples (lockstep: the same patches)."""
    dpar_model, _, entropy, settings = models
    labels = torch.arange(BATCH) % 10
    result = {}
    for name, (threshold, max_patch) in settings.items():
        _, patches = dpar_model.generate(labels, entropy_model=entropy, threshold=threshold,
                                         max_patch_size=max_patch, generator=torch.Generator().manual_seed(1),
                                         return_patches=True)
        result[name] = [patches.image(b).patch_lengths.tolist() for b in range(BATCH)]
    return result


def predicted_ratio(costs: dict, per_image: list[list[int]], policy) -> tuple[float, int, int]:
    """(predicted images/s ratio to LlamaGen, local steps, global steps) at the measured costs."""
    advanced, served = simulate_schedule(per_image, policy)
    seconds = sum(step_cost(costs, "local", n) for n in advanced) + sum(step_cost(costs, "global", n)
                                                                        for n in served)
    return sum(per_image[0]) * costs["base"] / seconds, len(advanced), len(served)


def _layer_params(width: int) -> float:
    hidden = -(-int(8 * width / 3) // 256) * 256
    return 4 * width * width + 3 * width * hidden


def roofline_step(layers: int, width: int, rows: int, context: int, head: int = 0) -> float:
    """Seconds of one decode step on GPU: ``layers`` blocks of ``width`` (+ a ``head``-row vocabulary projection)
    for ``rows`` rows attending to ``context`` cached tokens."""
    params = layers * _layer_params(width) + head * width
    kv_values = 2 * layers * rows * context * width
    seconds_bytes = (params + kv_values) * GPU["bytes_per_value"] / GPU["bandwidth"]
    flops = 2 * rows * params + 4 * layers * rows * context * width
    return max(seconds_bytes, flops / GPU["flops"])


def projected_ratio(depth: str, per_image: list[list[int]], policy, batch: int) -> float:
    """Projected images/s ratio DPAR / LlamaGen at ``depth`` with CFG (2 rows per image), vocabulary 16384."""
    width, encoder, global_layers, decoder = DEPTHS[depth]
    rows, length, vocab = 2 * batch, sum(per_image[0]), 16384
    patches = sum(map(len, per_image)) / len(per_image)
    base = length * roofline_step(encoder + global_layers + decoder, width, rows, length // 2, vocab)
    local = (roofline_step(encoder + decoder, width, rows, length // 2, vocab)
             + roofline_step(8, 512, batch, length // 2, vocab))  # the entropy model ("entropy" config)
    advanced, served = simulate_schedule(per_image, policy)
    global_step = roofline_step(global_layers + 1, width, rows, int(patches // 2))  # + 1: the patch refiner
    seconds = len(advanced) * local + len(served) * global_step
    return base / seconds


def structured_patches(entropy, images: int, reduction: float, max_patch: int) -> list[list[int]]:
    """Patch lengths the entropy model gives ``images`` structured 16 x 16 grids at ``reduction`` tokens per patch."""
    grid = 16
    tokens = structured_grids(images, grid, SIZES.vocab, torch.Generator().manual_seed(5))
    entropies = entropy.entropies(tokens)
    threshold = threshold_for_reduction(entropies, grid, reduction)
    lengths, cu = entropy_patch_lengths(entropies, threshold=threshold, max_patch_size=max_patch, row_width=grid)
    flat, cu = lengths.tolist(), cu.tolist()
    return [flat[cu[b]:cu[b + 1]] for b in range(images)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", help="write the rows here (benchmarks/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = bench_sampling.build_models()
    label = machine_label()
    print(label, "| load", open("/proc/loadavg").read().split()[:3])
    costs = measured_costs(models)
    names = {name: name if name == "base" else f"{name[0]} {name[1]} images" for name in costs}
    print(", ".join(f"{names[name]} {1e3 * s:.2f} ms" for name, s in costs.items()), "per step")
    rows = [dict(kind="measured cost", config="1+4+2 w256", setting="", policy="",
                 batch=BATCH if name == "base" else name[1], figure=f"{name if name == 'base' else name[0]} step ms",
                 value=f"{1e3 * s:.3f}") for name, s in costs.items()]
    for setting, per_image in sampled_patches(models).items():
        for name, policy in POLICIES.items():
            ratio, local_steps, global_steps = predicted_ratio(costs, per_image, policy)
            print(f"CPU {setting:8s} {name:9s}: predicted {ratio:.2f}x, {local_steps} local, {global_steps} global")
            rows.append(dict(kind="predicted (measured costs)", config="1+4+2 w256", setting=setting, policy=name,
                             batch=BATCH, figure="x LlamaGen images/s", value=f"{ratio:.3f}"))
    entropy = models[2]
    for batch in (16, 64, 256):
        per_image = structured_patches(entropy, batch, 2.0, 4)
        for depth in DEPTHS:
            line = []
            for name, policy in POLICIES.items():
                ratio = projected_ratio(depth, per_image, policy, batch)
                line.append(f"{name} {ratio:.2f}x")
                rows.append(dict(kind="projected (GPU roofline)", config=depth, setting="paper", policy=name,
                                 batch=batch, figure="x LlamaGen images/s", value=f"{ratio:.3f}"))
            print(f"GPU {depth:2s} batch {batch:3d}: " + ", ".join(line))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*rows[0], "cpu", "command"], lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow(dict(row, cpu=label, command="python -m benchmarks.sampling_cost_model"))
        print("wrote", os.path.relpath(args.csv))


if __name__ == "__main__":
    main()
