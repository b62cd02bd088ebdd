"""PatchBatch construction, the Patcher, and DPAR's global sequence in the one-token-patch limit."""
import pytest
import torch
from model_utils import patch_batch, random_batch, single_thread, tiny_models  # noqa: F401

import dpar
import dpar_kernels as dk
from dpar.model.patcher import PatchBatch


def test_patch_batch_offsets_and_positions():
    patches = patch_batch([[4, 2, 2, 1, 3, 4], [4, 4, 4, 4]], grid_width=4)
    assert patches.cu_patches.tolist() == [0, 6, 10]
    assert patches.cu_tokens.tolist() == [0, 4, 6, 8, 9, 12, 16, 20, 24, 28, 32]
    assert patches.positions.tolist() == [[0, 0, 3], [1, 0, 1], [1, 2, 3], [2, 0, 0], [2, 1, 3], [3, 0, 3],
                                          [0, 0, 3], [1, 0, 3], [2, 0, 3], [3, 0, 3]]
    assert patches.cu_global.tolist() == [0, 7, 12]
    assert (patches.max_patch_length, patches.max_global_length) == (4, 7)
    assert (patches.num_images, patches.num_patches, patches.num_tokens, patches.tokens_per_image) == (2, 10, 32, 16)
    assert patches.image_of_patch().tolist() == [0] * 6 + [1] * 4
    for name in ("patch_lengths", "cu_patches", "cu_tokens", "cu_global"):
        assert getattr(patches, name).dtype == torch.int32, name


def test_patch_batch_rejects_bad_patchings():
    with pytest.raises(ValueError, match="crosses a grid row"):
        patch_batch([[3, 2, 3, 4, 4]], grid_width=4)
    with pytest.raises(ValueError, match="same number of tokens"):
        patch_batch([[4, 4], [4]], grid_width=4)
    with pytest.raises(ValueError, match="at least one patch"):
        PatchBatch.from_lengths(torch.tensor([4], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32), 4)


def test_patcher_matches_entropy_patch_lengths():
    config, _, _, entropy_model = tiny_models()
    tokens = torch.randint(0, config.vocab_size, (3, config.tokens_per_image))
    entropy = entropy_model.entropies(tokens)
    threshold = float(entropy.double().median())
    patches = dpar.Patcher(entropy_model, threshold, max_patch_size=3)(tokens)
    lengths, cu = dk.entropy_patch_lengths(entropy, threshold=threshold, max_patch_size=3,
                                           row_width=config.grid_width)
    assert torch.equal(patches.patch_lengths, lengths) and torch.equal(patches.cu_patches, cu)
    assert 3 * config.grid_height < patches.num_patches < 3 * config.tokens_per_image


def test_one_token_patches_give_one_global_row_per_token():
    """threshold=-inf and max_patch_size=1: every token is a patch, the global sequence is [class] + T tokens."""
    config, model, _, entropy_model = tiny_models()
    tokens = torch.randint(0, config.vocab_size, (2, config.tokens_per_image))
    patches = dpar.Patcher(entropy_model, float("-inf"), max_patch_size=1)(tokens)
    assert patches.patch_lengths.tolist() == [1] * 2 * config.tokens_per_image
    assert patches.cu_global.tolist() == [0, config.tokens_per_image + 1, 2 * (config.tokens_per_image + 1)]
    seen = {}
    hook = model.global_stack.register_forward_hook(lambda m, args, out: seen.update(rows=args[0].shape[0]))
    with torch.no_grad():
        model(tokens, torch.tensor([1, 2]), patches)
    hook.remove()
    assert seen["rows"] == 2 * (config.tokens_per_image + 1)
    _, patches_used = model.generate([1], entropy_model=entropy_model, threshold=float("-inf"), max_patch_size=1,
                                     temperature=0.0, return_patches=True)
    assert patches_used.patch_lengths.tolist() == [1] * config.tokens_per_image


def test_patch_batch_to_and_image():
    config = dpar.get_config("tiny")
    _, _, patches, per_image = random_batch(config, images=3, seed=4)
    moved = patches.to("cpu")
    assert torch.equal(moved.cu_tokens, patches.cu_tokens) and moved.grid_width == config.grid_width
    for b in range(3):
        assert patches.image(b).patch_lengths.tolist() == per_image[b]
