"""Causality: changing token t never changes the logits that predict tokens <= t (random float64 weights)."""
import pytest
import torch
from model_utils import patch_batch, random_batch, single_thread, tiny_models  # noqa: F401


def _logits(model, tokens, labels, patches):
    with torch.no_grad():
        return model(tokens, labels, patches).view(tokens.shape[0], tokens.shape[1], -1)


@pytest.mark.parametrize("name", ["dpar", "baseline"])
def test_changing_a_token_only_changes_later_predictions(name):
    config, dpar_model, baseline, _ = tiny_models()
    model = dpar_model if name == "dpar" else baseline
    tokens, labels, patches, per_image = random_batch(config, images=2, max_len=4, seed=3)
    reference = _logits(model, tokens, labels, patches)
    # patch starts of image 0, to report which positions cross a boundary
    starts = set(torch.tensor(per_image[0]).cumsum(0)[:-1].tolist()) | {0}
    assert len(starts) > config.grid_height, "the patching should have patches longer than one token"
    for t in range(config.tokens_per_image):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1 + t) % config.vocab_size
        logits = _logits(model, changed, labels, patches)
        assert torch.equal(logits[0, :t + 1], reference[0, :t + 1]), f"token {t} leaked into earlier predictions"
        assert torch.equal(logits[1], reference[1]), f"token {t} of image 0 leaked into image 1"
        if t + 1 < config.tokens_per_image:
            assert not torch.allclose(logits[0, t + 1:], reference[0, t + 1:]), f"token {t} has no effect"


def test_dpar_later_patches_see_the_whole_previous_patch():
    """The last token of a patch reaches the first token of the next patch through the global shift, and the
    decoder's previous-token input; tokens inside a later patch all change."""
    config, dpar_model, _, _ = tiny_models()
    per_image = [[4, 4, 2, 2, 1, 3]]
    patches = patch_batch(per_image, config.grid_width)
    tokens = torch.randint(0, config.vocab_size, (1, config.tokens_per_image))
    labels = torch.tensor([3])
    reference = _logits(dpar_model, tokens, labels, patches)
    changed = tokens.clone()
    changed[0, 1] = (changed[0, 1] + 5) % config.vocab_size  # inside patch 0 (tokens 0..3)
    logits = _logits(dpar_model, changed, labels, patches)
    assert torch.equal(logits[0, :2], reference[0, :2])
    # every later token changes, including those of later patches (through the global sequence)
    assert ((logits[0, 2:] - reference[0, 2:]).abs().amax(-1) > 0).all()


def test_entropy_model_is_causal():
    config, _, _, entropy_model = tiny_models()
    tokens = torch.randint(0, config.vocab_size, (1, config.tokens_per_image))
    reference = entropy_model.entropies(tokens)
    for t in (0, 5, config.tokens_per_image - 1):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % config.vocab_size
        assert torch.equal(entropy_model.entropies(changed)[0, :t], reference[0, :t])
