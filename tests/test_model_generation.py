"""KV-cache generation equals a slow reference that recomputes the full forward for every token."""
import pytest
import torch
from model_utils import patch_batch, single_thread, tiny_models  # noqa: F401

import dpar
from dpar.sampling import guided_logits, sample_logits


def _rows(labels, cfg_scale, null_class):
    return labels if cfg_scale == 1.0 else torch.cat([labels, torch.full_like(labels, null_class)])


def _doubled(tokens, rows):
    return tokens if tokens.shape[0] == rows else torch.cat([tokens, tokens])


def _pick(logits, batch, cfg_scale, sampling):
    if logits.shape[0] != batch:
        logits = guided_logits(logits, cfg_scale)
    return sample_logits(logits, **sampling)


def reference_baseline(model, labels, cfg_scale, sampling):
    rows_labels = _rows(labels, cfg_scale, model.config.num_classes)
    tokens = torch.zeros(labels.numel(), 0, dtype=torch.long)
    for t in range(model.config.tokens_per_image):
        prefix = _doubled(torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1)], 1), rows_labels.numel())
        logits = model(prefix, rows_labels).view(prefix.shape[0], t + 1, -1)[:, t]
        tokens = torch.cat([tokens, _pick(logits, labels.numel(), cfg_scale, sampling)[:, None]], 1)
    return tokens


def reference_dpar(model, entropy_model, labels, threshold, max_patch_size, cfg_scale, sampling):
    """Boundaries from full entropy recomputation; logits from a full forward over the prefix, whose open
    patch holds the tokens so far plus a dummy token t (causality keeps it invisible)."""
    c, batch = model.config, labels.numel()
    rows_labels = _rows(labels, cfg_scale, c.num_classes)
    tokens = torch.zeros(batch, 0, dtype=torch.long)
    finished, start = [[] for _ in range(batch)], [0] * batch
    for t in range(c.tokens_per_image):
        if t > 0:
            entropy = entropy_model.entropies(tokens)[:, t - 1].double()
            for b in range(batch):
                if t % c.grid_width == 0 or entropy[b] > threshold[b] or t - start[b] == max_patch_size:
                    finished[b].append(t - start[b])
                    start[b] = t
        per_image = [finished[b] + [t + 1 - start[b]] for b in range(batch)]
        patches = patch_batch(per_image * (rows_labels.numel() // batch), c.grid_width)
        prefix = _doubled(torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1)], 1), rows_labels.numel())
        logits = model(prefix, rows_labels, patches).view(prefix.shape[0], t + 1, -1)[:, t]
        tokens = torch.cat([tokens, _pick(logits, batch, cfg_scale, sampling)[:, None]], 1)
    return tokens, [finished[b] + [c.tokens_per_image - start[b]] for b in range(batch)]


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
    expected_tokens, expected_patches = reference_dpar(
        model, entropy_model, labels, [threshold] * 3, 3, cfg_scale,
        dict(sampling, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(patches.patch_lengths, patch_batch(expected_patches, config.grid_width).patch_lengths)
    assert torch.equal(patches.cu_patches, patch_batch(expected_patches, config.grid_width).cu_patches)
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
    expected_tokens, expected_patches = reference_dpar(model, entropy_model, labels, threshold.tolist(), 4, 1.0,
                                                       dict(temperature=0.0))
    assert torch.equal(tokens, expected_tokens)
    assert expected_patches[0] == [1] * config.tokens_per_image
    assert torch.equal(patches.patch_lengths, patch_batch(expected_patches, config.grid_width).patch_lengths)


@pytest.mark.parametrize("cfg_scale,sampling", SAMPLINGS)
def test_baseline_cached_generation_matches_full_recomputation(cfg_scale, sampling):
    _, _, baseline, _ = tiny_models()
    labels = torch.tensor([1, 4, 9])
    tokens = baseline.generate(labels, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(7), **sampling)
    expected = reference_baseline(baseline, labels, cfg_scale,
                                  dict(sampling, generator=torch.Generator().manual_seed(7)))
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
