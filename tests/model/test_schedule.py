"""Out-of-step sampling gives each image the lockstep sampler's tokens and patches (same noise), with fewer global
steps; a gathered step computes each row as a step over every row does (bit for bit: what makes the schedules agree
on a CPU); the policy and the masked and gathered KV-cache steps behave as documented."""
import pytest
import torch
from model_utils import single_thread, tiny_models  # noqa: F401

from dpar.model.dpar_sampler import DparSampler, gathers_rows
from dpar.model.kv_cache import KVCache
from dpar.model.schedule import LOCKSTEP, OUT_OF_STEP, WaitFraction, schedule_policy, simulate_schedule


def _median_threshold(config, entropy_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (4, config.tokens_per_image), generator=generator)
    return float(entropy_model.entropies(tokens).double().median())


def _run(models, labels, schedule, threshold, max_patch_size, seed=4, **sampling):
    """(tokens, PatchBatch, sampler) of one DparSampler run."""
    _, model, _, entropy_model = models
    batch = labels.numel()
    sampler = DparSampler(model, batch, entropy_model=entropy_model, threshold=threshold,
                          max_patch_size=max_patch_size, schedule=schedule, **sampling)
    sampler.load(None, labels, sampler.draw_noise(batch, torch.Generator().manual_seed(seed)))
    tokens, patches = sampler.run()
    return tokens, patches, sampler


CASES = [
    pytest.param(4, "median", 3, dict(cfg_scale=3.0, temperature=1.0, top_k=20), id="b4-cfg-topk"),
    pytest.param(6, "median", 4, dict(temperature=0.9, top_p=0.8), id="b6-topp"),
    pytest.param(5, "low", 2, dict(temperature=1.0), id="b5-low-threshold"),
    pytest.param(3, "inf", 3, dict(temperature=1.0), id="b3-fixed-patches"),
    pytest.param(1, "median", 4, dict(cfg_scale=2.0, temperature=1.0), id="b1"),
    pytest.param(4, "median", 1, dict(temperature=1.0), id="max-patch-1"),
    pytest.param(4, "median", 3, dict(temperature=0.0), id="greedy"),
]


@pytest.mark.parametrize("batch,threshold,max_patch_size,sampling", CASES)
@pytest.mark.parametrize("schedule", ["out_of_step", WaitFraction(0.5), WaitFraction(1.0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["static", "gathered"])
def test_out_of_step_gives_the_lockstep_tokens(dtype, schedule, batch, threshold, max_patch_size, sampling):
    models = tiny_models(dtype, grid_width=6, grid_height=3)
    assert DparSampler(models[1], 1, entropy_model=models[3], threshold=1.0, max_patch_size=2).gathered == (
        dtype == torch.float32)
    config, entropy_model = models[0], models[3]
    threshold = {"median": _median_threshold(config, entropy_model), "inf": float("inf"),
                 "low": _median_threshold(config, entropy_model) - 0.05}[threshold]
    labels = torch.arange(batch) % config.num_classes
    tokens, patches, sampler = _run(models, labels, schedule, threshold, max_patch_size, **sampling)
    expected, expected_patches, lockstep = _run(models, labels, "lockstep", threshold, max_patch_size, **sampling)
    assert torch.equal(tokens, expected)
    assert torch.equal(patches.patch_lengths, expected_patches.patch_lengths)
    assert torch.equal(patches.cu_patches, expected_patches.cu_patches)
    assert lockstep.local_steps == config.tokens_per_image
    assert sampler.local_steps >= config.tokens_per_image
    assert sampler.global_steps <= lockstep.global_steps
    fewest = int(expected_patches.patches_per_image().max()) - 1  # global steps if all patches were aligned
    if lockstep.global_steps > fewest + 2 and schedule_policy(schedule, sampler.gathered).fraction >= 0.5:
        # unaligned patches, a policy that waits for half the batch: fewer global steps
        assert sampler.global_steps < lockstep.global_steps, (sampler.global_steps, lockstep.global_steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_schedules_agree_in_low_precision(dtype):
    """Every step computes every row at its place in a same-sized batch, so the schedules agree bit for bit in
    float32 and bfloat16 too (not only in float64, where rounding could hardly flip a token)."""
    models = tiny_models(dtype, seed=5, grid_width=8, grid_height=4)
    config, entropy_model = models[0], models[3]
    threshold = _median_threshold(config, entropy_model)
    labels = torch.arange(12) % config.num_classes
    runs = [_run(models, labels, schedule, threshold, 4, cfg_scale=2.0, temperature=1.0)
            for schedule in ("lockstep", "out_of_step", WaitFraction(1.0))]
    for tokens, patches, _ in runs[1:]:
        assert torch.equal(tokens, runs[0][0])
        assert torch.equal(patches.patch_lengths, runs[0][1].patch_lengths)
    assert runs[2][2].global_steps < runs[0][2].global_steps


def test_generate_schedules_agree_and_match_the_lockstep_default_of_before():
    """DPAR.generate: both schedules give the same tokens; lockstep runs one local step per token."""
    models = tiny_models(seed=3)
    config, model, _, entropy_model = models
    threshold = _median_threshold(config, entropy_model)
    run = dict(entropy_model=entropy_model, threshold=threshold, max_patch_size=3, temperature=1.0,
               return_patches=True)
    labels = torch.tensor([1, 2, 3, 4])
    default, _ = model.generate(labels, generator=torch.Generator().manual_seed(0), **run)
    lockstep, _ = model.generate(labels, generator=torch.Generator().manual_seed(0), schedule="lockstep", **run)
    assert torch.equal(default, lockstep)
    with pytest.raises(ValueError, match="schedule"):
        model.generate(labels, schedule="eventually", **run)


def test_an_image_finishes_early_and_the_others_finish_after_it():
    """Image 0 closes a patch at every token (threshold -inf), image 1 every 4 tokens (+inf, max patch 4): under an
    all-wait policy each global step finds image 0 one token on and image 1 four, so image 1 finishes (16 tokens,
    4 rounds) while image 0 is at token 4, and image 0 then runs alone; both get their lockstep tokens."""
    models = tiny_models(seed=1, grid_width=8, grid_height=2)
    config = models[0]
    labels = torch.tensor([3, 5])
    threshold = torch.tensor([float("-inf"), float("inf")])
    _, model, _, entropy_model = models
    sampler = DparSampler(model, 2, entropy_model=entropy_model, threshold=threshold, max_patch_size=4,
                          schedule=WaitFraction(1.0), temperature=1.0)
    sampler.load(None, labels, sampler.draw_noise(2, torch.Generator().manual_seed(2)))
    gaps = []
    while sampler.step():
        gaps.append(int(sampler.images.position[1] - sampler.images.position[0]))
    expected, _, _ = _run(models, labels, "lockstep", threshold, 4, seed=2, temperature=1.0)
    assert torch.equal(sampler.tokens, expected)
    assert max(gaps) == config.tokens_per_image - 4 and gaps[-1] == 0, gaps
    assert sampler.global_steps == config.tokens_per_image - 1  # image 0's patches; image 1's fall on the same steps
    assert sampler.local_steps == 4 * 4 + config.tokens_per_image - 4  # 4 rounds of 4, then image 0 alone
    assert sampler.images.patch_batch().patches_per_image().tolist() == [config.tokens_per_image, 4]


def test_slots_reloaded_while_others_run_give_the_tokens_of_a_fresh_batch():
    """Continuous batching: a slot reloaded mid-run samples its new image exactly as a batch of one would."""
    models = tiny_models(seed=2)
    config, model, _, entropy_model = models
    threshold = _median_threshold(config, entropy_model)
    knobs = dict(entropy_model=entropy_model, threshold=threshold, max_patch_size=3, cfg_scale=2.0, temperature=1.0)
    sampler = DparSampler(model, 2, **knobs)
    sampler.load(None, torch.tensor([1, 2]), sampler.draw_noise(2, torch.Generator().manual_seed(0)))
    for _ in range(5):
        sampler.step()
    new_noise = sampler.draw_noise(1, torch.Generator().manual_seed(9))
    sampler.load(torch.tensor([0]), torch.tensor([7]), new_noise)
    tokens, _ = sampler.run()
    alone = model.generate(torch.tensor([7]), generator=torch.Generator().manual_seed(9), **knobs)
    assert torch.equal(tokens[0], alone[0])
    pair = model.generate(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), **knobs)
    assert torch.equal(tokens[1], pair[1])


def test_wait_fraction_policy():
    assert LOCKSTEP.run_global(1, 16)
    half = WaitFraction(0.5)
    assert not half.run_global(7, 16) and half.run_global(8, 16) and half.run_global(1, 1)
    assert WaitFraction(1.0).run_global(3, 3) and not WaitFraction(1.0).run_global(2, 3)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="fraction"):
            WaitFraction(bad)
    assert schedule_policy(half, True) is half and schedule_policy("lockstep", False) == LOCKSTEP
    assert schedule_policy("out_of_step", False) == OUT_OF_STEP[False]
    with pytest.raises(ValueError, match="schedule"):
        schedule_policy("sometimes", True)


def test_a_masked_cache_step_appends_only_the_active_rows():
    cache = KVCache(1, 3, 4, 1, 2, torch.float64, "cpu")
    x = torch.randn(3, 1, 2, dtype=torch.float64)
    cache.begin(active=torch.tensor([True, False, True]))
    cache.attend(0, x, x, x)
    cache.commit()
    assert cache.lengths.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="rows or active"):
        cache.begin(torch.tensor([0]), torch.tensor([True, False, True]))


@pytest.mark.parametrize("schedule", ["lockstep", WaitFraction(0.5), WaitFraction(1.0)], ids=str)
def test_the_schedule_simulation_counts_the_sampler_steps(schedule):
    models = tiny_models(seed=4, grid_width=6, grid_height=3)
    config, entropy_model = models[0], models[3]
    labels = torch.arange(5)
    _, patches, sampler = _run(models, labels, schedule, _median_threshold(config, entropy_model), 3)
    per_image = [patches.image(b).patch_lengths.tolist() for b in range(5)]
    advanced, served = simulate_schedule(per_image, schedule_policy(schedule, sampler.gathered))
    assert (len(advanced), len(served)) == (sampler.local_steps, sampler.global_steps)
    assert sum(advanced) == 5 * config.tokens_per_image  # every token is sampled once
    assert sum(served) == patches.num_patches - 5  # every patch but each image's last is served once


def _sampler_mid_image(models, batch, steps, threshold, **sampling):
    """A lockstep DparSampler of ``batch`` images after ``steps`` scheduling steps."""
    _, model, _, entropy_model = models
    sampler = DparSampler(model, batch, entropy_model=entropy_model, threshold=threshold, max_patch_size=4,
                          schedule="lockstep", **sampling)
    sampler.load(None, torch.arange(batch) % models[0].num_classes,
                 sampler.draw_noise(batch, torch.Generator().manual_seed(7)))
    for _ in range(steps):
        sampler.step()
    return sampler


def _step_args(sampler, kind, slots):
    if kind == "local":
        return (sampler.model, sampler.decoder_cache, sampler.encoder_cache, sampler.entropy_model,
                sampler.entropy_cache, sampler.images, sampler.previous, sampler.condition, sampler.noise,
                sampler.tokens, sampler.states, sampler.keys_values, slots, sampler.batch, sampler.cfg_scale,
                sampler.sampling)
    sampler.images.start.copy_((sampler.images.position - 3).clamp(min=0))  # patches of up to 3 tokens close
    return (sampler.model, sampler.global_cache, sampler.condition, sampler.states, sampler.keys_values,
            sampler.images, sampler.max_patch_size, slots, sampler.batch)


def test_steps_are_gathered_in_float32_on_a_cpu():
    assert gathers_rows(torch.device("cpu"), torch.float32)
    assert not gathers_rows(torch.device("cpu"), torch.float64)  # BLAS rounds a row by the number of rows
    assert not gathers_rows(torch.device("cpu"), torch.bfloat16)
    assert not gathers_rows(torch.device("meta"), torch.float32)


@pytest.mark.parametrize("kind", ["local", "global"])
@pytest.mark.parametrize("images", [7, 20], ids=["7-images", "20-images"])
@torch.no_grad()
def test_a_gathered_step_computes_each_row_as_a_step_over_every_row_does(kind, images):
    """Batch invariance, bit for bit: a step over some images gives each of their rows (CFG twins included) what a
    step over every image gives it (20 images: 40 rows, more than one gathered step's LINEAR_MAX_ROWS); the
    images it leaves out are untouched."""
    models = tiny_models(torch.float32, seed=6, grid_width=8, grid_height=4)
    threshold = _median_threshold(models[0], models[3])
    every, some = (_sampler_mid_image(models, images, 9, threshold, cfg_scale=2.0, temperature=1.0)
                   for _ in range(2))
    assert every.gathered
    slots = torch.tensor([1, 4, 5])
    rows = torch.cat([slots, slots + images])
    others = torch.tensor([r for r in range(2 * images) if r not in rows.tolist()])
    before = some.states.clone(), some.condition.clone(), some.previous.clone()
    step = every._local_step if kind == "local" else every._global_step
    for part in torch.arange(images).split(every.images_per_step):
        step(*_step_args(every, kind, part))
    step(*_step_args(some, kind, slots))
    caches = ("decoder_cache", "encoder_cache") if kind == "local" else ("global_cache",)
    for name in caches:
        full, part = getattr(every, name), getattr(some, name)
        assert torch.equal(full.lengths[rows], part.lengths[rows])
        assert torch.equal(full.k[:, rows], part.k[:, rows]) and torch.equal(full.v[:, rows], part.v[:, rows])
    for name in ("states", "keys_values", "previous", "condition"):
        assert torch.equal(getattr(every, name)[rows], getattr(some, name)[rows]), name
    if kind == "local":
        assert torch.equal(every.tokens[slots], some.tokens[slots])
        assert torch.equal(every.images.position[slots], some.images.position[slots])
        assert torch.equal(every.images.waiting[slots], some.images.waiting[slots])
    for kept, now in zip(before, (some.states, some.condition, some.previous)):
        assert torch.equal(kept[others], now[others])


@torch.no_grad()
def test_a_gathered_cache_step_appends_only_its_rows_and_matches_a_full_step():
    cache, full = (KVCache(1, 3, 4, 1, 8, torch.float32, "cpu") for _ in range(2))
    x = torch.randn(3, 1, 8)
    for c in (cache, full):
        c.begin()
        c.attend(0, x, x, x)
        c.commit()
    y = torch.randn(3, 1, 8)
    full.begin()
    expected = full.attend(0, y, y, y)
    full.commit()
    rows = torch.tensor([2, 0])
    cache.begin(rows)
    out = cache.attend(0, y[rows], y[rows], y[rows])
    cache.commit()
    assert cache.lengths.tolist() == [2, 1, 2]
    assert torch.equal(out, expected[rows])
    assert torch.equal(cache.k[0, rows, :2], full.k[0, rows, :2])
