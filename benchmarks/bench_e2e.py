"""End-to-end benchmarks: a DPAR training step vs the LlamaGen baseline, dk kernels vs padded torch ops, eager vs
torch.compile (with the host reads of a step), and sampling with a KV cache vs full recomputation.

    pytest benchmarks/bench_e2e.py --benchmark-only        (DPAR_BENCH_QUICK=1: tiny sizes, seconds)

Patches come from a briefly trained EntropyModel on structured synthetic grids, thresholded for ~2x fewer
global tokens (benchmarks/workloads.py). FLOPs are analytic (dpar.flops); times are measured in the same run.
"""
import pytest
import torch

from benchmarks import padded_ops
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
    training_batch,
    training_flops,
    training_step,
)
from dpar.model import full_recompute
from dpar_kernels.testing import HostReadCounter

WARMUP = 1  # the first step allocates (optimizer state, caches): never timed
_TIMES: dict[tuple[str, str], float] = {}  # (group, impl) -> mean seconds, for ratios inside one run
TRAIN_GROUP = "e2e train step: DPAR vs LlamaGen"
KERNEL_GROUP = "e2e train step: dk kernels vs padded torch ops"
COMPILE_GROUP = "e2e train step: eager vs torch.compile (DPAR)"


@pytest.fixture(scope="module")
def entropy_model():
    return train_entropy_model()


@pytest.fixture(scope="module")
def batch(entropy_model):
    return training_batch(entropy_model, SIZES.batch, SIZES.grid, seed=1)


def _common_info(batch) -> dict:
    images = batch.tokens.shape[0]
    shape = (f"batch {images} of {SIZES.grid}x{SIZES.grid} tokens, width {SIZES.width}, {SIZES.heads} heads, "
             f"layers {'+'.join(map(str, SIZES.layers))}, vocab {SIZES.vocab}")
    return dict(shape=shape, backend=kernel_backend(), quick=QUICK, grid=SIZES.grid, batch=images,
                threshold=batch.threshold, tokens_per_image=batch.patches.tokens_per_image,
                patches_per_image=batch.patches.num_patches / images)


def _time_train_step(benchmark, kind: str, batch):
    model, optimizer = new_model(kind, SIZES.grid)
    benchmark.pedantic(training_step(model, optimizer, batch), rounds=SIZES.rounds, warmup_rounds=WARMUP,
                       iterations=1)
    return mean_time(benchmark)


@pytest.mark.parametrize("kind", ["baseline", "dpar"])  # baseline first: the DPAR row reports ratios to it
def test_train_step_dpar_vs_baseline(benchmark, kind, batch):
    flops = training_flops(kind, SIZES.grid, batch)
    impl = "LlamaGen baseline" if kind == "baseline" else "DPAR"
    record(benchmark, TRAIN_GROUP, impl, baseline=kind == "baseline", flops=flops["total"],
           global_tokens=flops["global_tokens"], **_common_info(batch))
    seconds = _time_train_step(benchmark, kind, batch)
    _TIMES[(TRAIN_GROUP, kind)] = seconds
    base_time = _TIMES.get((TRAIN_GROUP, "baseline"))
    if kind == "dpar" and seconds and base_time:
        base_flops = training_flops("baseline", SIZES.grid, batch)
        flop_ratio, time_ratio = flops["total"] / base_flops["total"], seconds / base_time
        token_ratio = base_flops["global_tokens"] / flops["global_tokens"]
        benchmark.extra_info.update(flop_ratio=flop_ratio, time_ratio=time_ratio, global_token_reduction=token_ratio)
        flop_saving, time_saving = 1 - flop_ratio, 1 - time_ratio
        verdict = (f"the time saving reaches {time_saving / flop_saving:.0%} of the FLOP saving"
                   if time_saving > 0 and flop_saving > 0 else "no time saving")
        print(f"\nDPAR vs LlamaGen: {token_ratio:.2f}x fewer global tokens; FLOPs x{flop_ratio:.3f} "
              f"(saving {flop_saving:.1%}), step time x{time_ratio:.3f} (saving {time_saving:.1%}): {verdict}")


@pytest.mark.parametrize("ops", ["padded", "kernels"])
def test_train_step_kernels_vs_padded(benchmark, ops, batch):
    flops = training_flops("dpar", SIZES.grid, batch)
    impl = f"DPAR, dk ops ({kernel_backend()})" if ops == "kernels" else "DPAR, padded torch ops"
    record(benchmark, KERNEL_GROUP, impl, baseline=ops == "padded", flops=flops["total"], **_common_info(batch))
    if ops == "padded":
        with padded_ops.swapped_in():
            _time_train_step(benchmark, "dpar", batch)
    else:
        _time_train_step(benchmark, "dpar", batch)


def _loss_reads(loss_fn, batch) -> list[str]:
    """The host reads (dpar_kernels.testing.HostReadCounter) of one loss forward + backward."""
    with HostReadCounter() as counter:
        loss_fn(batch.tokens, batch.labels, batch.patches).backward()
    return counter.calls


@pytest.mark.parametrize("mode", ["eager", "compiled"])  # eager first: the compiled row reports the ratio to it
def test_train_step_eager_vs_compiled(benchmark, mode, batch):
    """torch.compile(model.loss, fullgraph=True, dynamic=True) (inductor), as `dpar train --compile`; the
    compilation happens in an untimed first step."""
    model, optimizer = new_model("dpar", SIZES.grid)
    loss_fn = model.loss if mode == "eager" else torch.compile(model.loss, fullgraph=True, dynamic=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(batch.tokens, batch.labels, batch.patches).backward()
        optimizer.step()

    step()  # compiles (compiled mode) and allocates the optimizer state
    # the counter's dispatch mode cannot run compiled code; a fullgraph graph holds no host read (it would not trace)
    reads = _loss_reads(loss_fn, batch) if mode == "eager" else []
    record(benchmark, COMPILE_GROUP, f"DPAR, {mode}", baseline=mode == "eager", host_reads_per_step=len(reads),
           host_read_calls=reads, **_common_info(batch))
    benchmark.pedantic(step, rounds=SIZES.rounds, warmup_rounds=WARMUP, iterations=1)
    seconds = mean_time(benchmark)
    _TIMES[(COMPILE_GROUP, mode)] = seconds
    eager = _TIMES.get((COMPILE_GROUP, "eager"))
    if mode == "compiled" and seconds and eager:
        benchmark.extra_info["time_ratio"] = seconds / eager
        print(f"\nDPAR train step: compiled {seconds * 1e3:.0f} ms vs eager {eager * 1e3:.0f} ms "
              f"(x{seconds / eager:.3f})")
    if mode == "eager":
        print(f"\nhost reads per DPAR loss forward + backward: {len(reads)}")


@pytest.fixture(scope="module")
def sampling(entropy_model):
    """(DPAR, LlamaGen, entropy model, labels, threshold): the threshold gives ~2x fewer global steps on
    tokens that this (untrained) DPAR samples, calibrated on one generation."""
    dpar_model, _ = new_model("dpar", SIZES.sampling_grid)
    baseline, _ = new_model("baseline", SIZES.sampling_grid)
    entropy = entropy_model_for_grid(entropy_model, SIZES.sampling_grid)
    labels = torch.arange(SIZES.sampling_batch)
    tokens = dpar_model.eval().generate(labels, entropy_model=entropy, threshold=float("inf"),
                                        max_patch_size=4, generator=torch.Generator().manual_seed(0))
    threshold = threshold_for_reduction(entropy.entropies(tokens), SIZES.sampling_grid)
    return dpar_model, baseline.eval(), entropy, labels, threshold


def _sample(kind: str, sampling):
    """A closure sampling one batch of images; returns the global steps per image of DPAR runs."""
    dpar_model, baseline, entropy, labels, threshold = sampling
    if kind == "baseline cache":
        return lambda: baseline.generate(labels, generator=torch.Generator().manual_seed(1))
    generate = dpar_model.generate if kind == "dpar cache" else (
        lambda *a, return_patches, **k: full_recompute.generate_dpar(dpar_model, *a, **k))
    return lambda: generate(labels, entropy_model=entropy, threshold=threshold, max_patch_size=4,
                            generator=torch.Generator().manual_seed(1), return_patches=True)


SAMPLING_CASES = [  # (group, kind, label, is the group's baseline)
    ("e2e sampling: KV cache vs full recomputation", "dpar recompute", "DPAR, full recomputation", True),
    ("e2e sampling: KV cache vs full recomputation", "dpar cache", "DPAR, KV cache", False),
    ("e2e sampling: DPAR vs LlamaGen (KV cache)", "baseline cache", "LlamaGen baseline, KV cache", True),
    ("e2e sampling: DPAR vs LlamaGen (KV cache)", "dpar cache", "DPAR, KV cache", False),
]


@pytest.mark.parametrize("group,kind,impl,is_baseline", SAMPLING_CASES, ids=lambda v: str(v).replace(" ", "-"))
def test_sampling(benchmark, group, kind, impl, is_baseline, sampling):
    images = SIZES.sampling_batch
    record(benchmark, group, impl, shape=f"{images} image(s) of {SIZES.sampling_grid}x{SIZES.sampling_grid} tokens",
           baseline=is_baseline, backend=kernel_backend(), quick=QUICK,
           grid=SIZES.sampling_grid, images=images, threshold=sampling[4])
    warmup = 0 if kind == "dpar recompute" else 1  # recomputation is O(T^2): one untimed run would double it
    result = benchmark.pedantic(_sample(kind, sampling), rounds=1, warmup_rounds=warmup, iterations=1)
    if kind != "baseline cache":
        patches = result[1]
        benchmark.extra_info["global_steps_per_image"] = (patches.num_patches + images) / images
    seconds = mean_time(benchmark)
    if seconds:
        benchmark.extra_info["images_per_s"] = images / seconds
        print(f"\n{impl}: {images / seconds:.3f} images/s")
