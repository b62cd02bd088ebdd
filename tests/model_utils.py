"""Shared builders for the dpar model tests: tiny float64 models, random patch batches, a thread limit."""
import pytest
import torch

import dpar
from dpar.model.patcher import PatchBatch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models are latency bound; intra-op threads on a shared 2-core machine only add contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_models(dtype=torch.float64, seed: int = 0, **overrides):
    """(config, DPAR, LlamaGenBaseline, EntropyModel) with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = dpar.get_config("tiny", **overrides)
    entropy_config = dpar.get_config("entropy-tiny", vocab_size=config.vocab_size, grid_height=config.grid_height,
                                     grid_width=config.grid_width)
    models = (dpar.DPAR(config), dpar.LlamaGenBaseline(config), dpar.EntropyModel(entropy_config))
    return (config, *(m.to(dtype).eval() for m in models))


def random_patch_lengths(images: int, tokens: int, grid_width: int, max_len: int, generator=None):
    """Random patch lengths (never crossing a row) for ``images`` images of ``tokens`` tokens -> lists."""
    result = []
    for _ in range(images):
        lengths, position = [], 0
        while position < tokens:
            room = min(max_len, grid_width - position % grid_width, tokens - position)
            length = int(torch.randint(1, room + 1, (1,), generator=generator))
            lengths.append(length)
            position += length
        result.append(lengths)
    return result


def patch_batch(per_image: list[list[int]], grid_width: int) -> PatchBatch:
    flat = torch.tensor([n for image in per_image for n in image], dtype=torch.int32)
    counts = torch.tensor([len(image) for image in per_image])
    cu = torch.zeros(len(per_image) + 1, dtype=torch.int32)
    cu[1:] = counts.cumsum(0)
    return PatchBatch.from_lengths(flat, cu, grid_width)


def random_batch(config, images: int, max_len: int = 4, seed: int = 0, tokens: int | None = None):
    """(tokens int64 [B, T], labels int64 [B], PatchBatch, per-image patch length lists)."""
    generator = torch.Generator().manual_seed(seed)
    length = config.tokens_per_image if tokens is None else tokens
    token_grid = torch.randint(0, config.vocab_size, (images, length), generator=generator)
    labels = torch.randint(0, config.num_classes, (images,), generator=generator)
    per_image = random_patch_lengths(images, length, config.grid_width, max_len, generator)
    return token_grid, labels, patch_batch(per_image, config.grid_width), per_image
