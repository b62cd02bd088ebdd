"""KV-cache generation equals a slow reference that recomputes the full forward for every token."""
import functools

import pytest
import torch
import torch._dynamo
from model_utils import single_thread, tiny_models  # noqa: F401
from torch.overrides import _pop_mode_temporarily
from torch.utils._python_dispatch import _disable_current_modes

import dpar
from dpar.model import dpar_sampler, full_recompute, generation
from dpar_kernels.testing import HostReadCounter


def _per_image(patches) -> list[list[int]]:
    return [patches.image(b).patch_lengths.tolist() for b in range(patches.num_images)]


def _threshold_with_mixed_boundaries(config, entropy_model):
    """A threshold near the median entropy so images start patches at different times."""
    tokens = torch.randint(0, config.vocab_size, (4, config.tokens_per_image))
    return float(entropy_model.entropies(tokens).double().median())


SAMPLINGS = [
    pytest.param(1.0, dict(temperature=0.0), id="greedy"),
    pytest.param(3.0, dict(temperature=1.0, top_k=20), id="cfg-topk"),
    pytest.param(1.0, dict(temperature=0.9, top_p=0.8), id="topp"),
]


@pytest.mark.parametrize("cfg_scale,sampling", SAMPLINGS)
def test_dpar_cached_generation_matches_full_recomputation(cfg_scale, sampling):
    config, model, _, entropy_model = tiny_models()
    labels = torch.tensor([0, 3, 7])
    threshold = _threshold_with_mixed_boundaries(config, entropy_model)
    tokens, patches = model.generate(labels, entropy_model=entropy_model, threshold=threshold, max_patch_size=3,
                                     cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(5),
                                     return_patches=True, **sampling)
    expected_tokens, expected = full_recompute.generate_dpar(
        model, labels, entropy_model=entropy_model, threshold=threshold, max_patch_size=3, cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(5), **sampling)
    expected_patches = _per_image(expected)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(patches.patch_lengths, expected.patch_lengths)
    assert torch.equal(patches.cu_patches, expected.cu_patches)
    assert len({tuple(p) for p in expected_patches}) > 1, "images should end patches at different times"
    assert max(max(p) for p in expected_patches) > 1, "some patch should have several tokens"
    # the patches used are the ones the Patcher finds for the generated tokens
    again = dpar.Patcher(entropy_model, threshold, 3)(tokens)
    assert torch.equal(again.patch_lengths, patches.patch_lengths)


def test_dpar_generation_with_per_image_thresholds():
    config, model, _, entropy_model = tiny_models(seed=1)
    labels = torch.tensor([2, 2])
    median = _threshold_with_mixed_boundaries(config, entropy_model)
    threshold = torch.tensor([float("-inf"), median])
    tokens, patches = model.generate(labels, entropy_model=entropy_model, threshold=threshold, max_patch_size=4,
                                     temperature=0.0, return_patches=True)
    expected_tokens, expected = full_recompute.generate_dpar(model, labels, entropy_model=entropy_model,
                                                             threshold=threshold, max_patch_size=4, temperature=0.0)
    assert torch.equal(tokens, expected_tokens)
    assert _per_image(expected)[0] == [1] * config.tokens_per_image
    assert torch.equal(patches.patch_lengths, expected.patch_lengths)


@pytest.mark.parametrize("cfg_scale,sampling", SAMPLINGS)
def test_baseline_cached_generation_matches_full_recomputation(cfg_scale, sampling):
    _, _, baseline, _ = tiny_models()
    labels = torch.tensor([1, 4, 9])
    tokens = baseline.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(7), **sampling)
    expected = full_recompute.generate_baseline(baseline, labels, cfg_scale=cfg_scale,
                                                generator=torch.Generator().manual_seed(7), **sampling)
    assert tokens.shape == (3, baseline.config.tokens_per_image) and tokens.dtype == torch.long
    assert torch.equal(tokens, expected)


def test_generation_rejects_bad_arguments():
    config, model, baseline, entropy_model = tiny_models()
    with pytest.raises(ValueError, match="class_labels"):
        baseline.generate([config.num_classes + 1])
    with pytest.raises(ValueError, match="max_patch_size"):
        model.generate([1], entropy_model=entropy_model, threshold=1.0, max_patch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        baseline.generate([1], temperature=-1.0)


def _generate(kind, models, labels, threshold, compile=False, schedule="out_of_step"):
    config, model, baseline, entropy_model = models
    sampling = dict(cfg_scale=3.0, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3),
                    compile=compile)
    if kind == "baseline":
        return baseline.generate(labels, **sampling)
    return model.generate(labels, entropy_model=entropy_model, threshold=threshold, max_patch_size=3,
                          schedule=schedule, **sampling)


def _compiled_outside_the_modes(step, mode, dynamic):
    """The compiled step (dynamo, eager backend), run with the HostReadCounter's modes popped: dynamo does not run
    under a dispatch mode. The step is one graph (fullgraph), so it holds no host read; what is counted is
    everything around it."""
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="eager")

    def run(*args):
        with _pop_mode_temporarily(), _disable_current_modes():
            return compiled(*args)
    return run


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind,schedule,dtype", [("baseline", None, torch.float64),
                                                 ("dpar", "lockstep", torch.float64),
                                                 ("dpar", "out_of_step", torch.float64),
                                                 ("dpar", "out_of_step", torch.float32)],
                         ids=["baseline", "dpar-lockstep", "dpar-out_of_step", "dpar-gathered"])
def test_generation_reads_at_most_one_tensor_value_per_step(kind, schedule, dtype, compile, monkeypatch):
    """Host reads (device syncs on a GPU) per step (the baseline's token, DPAR's scheduling step), with mixed
    patch boundaries and CFG, eager and with compile=True, DPAR's steps over every row (float64) and gathered
    (float32 on a CPU: dpar_sampler.gathers_rows). The reads that do not depend on the length (argument checks, the
    final PatchBatch) are measured on a 1-row grid and subtracted."""
    if compile:
        monkeypatch.setattr(generation, "_compiled", functools.cache(_compiled_outside_the_modes))
        torch._dynamo.reset()
    steps = []
    counted_step = dpar_sampler.DparSampler.step
    monkeypatch.setattr(dpar_sampler.DparSampler, "step", lambda self: steps.append(1) or counted_step(self))
    models = tiny_models(dtype, global_layers=1)
    config = models[0]
    labels = torch.tensor([0, 3, 7])
    threshold = _threshold_with_mixed_boundaries(config, models[3])
    with HostReadCounter() as reads:
        _generate(kind, models, labels, threshold, compile, schedule)
    long_steps, steps[:] = len(steps), []
    short = tiny_models(dtype, grid_height=1, global_layers=1)
    with HostReadCounter() as fixed:
        _generate(kind, short, labels, threshold, compile, schedule)
    if kind == "baseline":
        per_step = (reads.count - fixed.count) / (config.tokens_per_image - short[0].tokens_per_image)
    else:
        assert long_steps > config.tokens_per_image
        per_step = (reads.count - fixed.count) / (long_steps - len(steps))
    assert per_step <= (0 if kind == "baseline" else 1), (reads.calls, fixed.calls)
    assert fixed.count <= 40, fixed.calls


def test_dpar_generation_with_infinite_threshold_uses_fixed_patches():
    """threshold +inf: patches of exactly max_patch_size (cut at rows), the entropy model is never run."""
    config, model, _, entropy_model = tiny_models(seed=2)
    labels = torch.tensor([1, 5])

    def broken_step(*args):
        raise AssertionError("the entropy model must not run with an infinite threshold")

    entropy_model.step = broken_step
    tokens, patches = model.generate(labels, entropy_model=entropy_model, threshold=float("inf"), max_patch_size=2,
                                     temperature=0.0, return_patches=True)
    expected_tokens, expected = full_recompute.generate_dpar(model, labels, entropy_model=entropy_model,
                                                             threshold=float("inf"), max_patch_size=2,
                                                             temperature=0.0)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(patches.patch_lengths, expected.patch_lengths)
    row = [2] * (config.grid_width // 2) + [1] * (config.grid_width % 2)
    assert _per_image(patches) == [row * config.grid_height] * 2
