"""Packing invariance: an image's loss and logits do not depend on which images share its batch."""
import torch
from helpers import assert_close
from model_utils import patch_batch, random_batch, single_thread, tiny_models  # noqa: F401


def test_dpar_and_baseline_logits_do_not_depend_on_batch_neighbours():
    config, dpar_model, baseline, _ = tiny_models()
    tokens, labels, patches, per_image = random_batch(config, images=4, max_len=4, seed=1)
    assert len({tuple(p) for p in per_image}) > 1, "images should have different patchings"
    with torch.no_grad():
        packed = {"dpar": dpar_model(tokens, labels, patches), "baseline": baseline(tokens, labels)}
        for b in range(4):
            alone_patches = patch_batch([per_image[b]], config.grid_width)
            rows = slice(b * config.tokens_per_image, (b + 1) * config.tokens_per_image)
            alone = dpar_model(tokens[b:b + 1], labels[b:b + 1], alone_patches)
            assert_close(packed["dpar"][rows], alone, torch.float64)
            assert_close(packed["baseline"][rows], baseline(tokens[b:b + 1], labels[b:b + 1]), torch.float64)
            assert torch.equal(patches.image(b).patch_lengths, alone_patches.patch_lengths)


def test_losses_are_means_of_per_image_losses():
    config, dpar_model, baseline, _ = tiny_models()
    tokens, labels, patches, per_image = random_batch(config, images=3, max_len=3, seed=2)
    with torch.no_grad():
        packed = dpar_model.loss(tokens, labels, patches)
        alone = [dpar_model.loss(tokens[b:b + 1], labels[b:b + 1], patch_batch([per_image[b]], config.grid_width))
                 for b in range(3)]
        assert_close(packed, torch.stack(alone).mean(), torch.float64)
        base_alone = [baseline.loss(tokens[b:b + 1], labels[b:b + 1]) for b in range(3)]
        assert_close(baseline.loss(tokens, labels), torch.stack(base_alone).mean(), torch.float64)


def test_entropies_do_not_depend_on_batch_neighbours():
    config, _, _, entropy_model = tiny_models()
    tokens = torch.randint(0, config.vocab_size, (3, config.tokens_per_image))
    together = entropy_model.entropies(tokens)
    assert together.dtype == torch.float32 and together.shape == tokens.shape
    for b in range(3):
        assert_close(together[b], entropy_model.entropies(tokens[b:b + 1])[0], torch.float32)


def test_non_contiguous_token_grids_give_the_same_logits():
    config, dpar_model, baseline, _ = tiny_models()
    tokens, labels, patches, _ = random_batch(config, images=2, seed=11)
    strided = tokens.t().contiguous().t()  # same values, column-major
    wide_labels = torch.stack([labels, labels], 1)[:, 0]  # stride 2
    assert not strided.is_contiguous() and not wide_labels.is_contiguous()
    with torch.no_grad():
        assert torch.equal(dpar_model(strided, wide_labels, patches), dpar_model(tokens, labels, patches))
        assert torch.equal(baseline(strided, wide_labels), baseline(tokens, labels))
