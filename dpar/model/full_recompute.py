"""Sampling without a KV cache: every token is predicted by a full forward over its whole prefix.

O(T^2) work per image. It is the reference the cached samplers of dpar.model.generation are tested against, and the
baseline of the sampling benchmark. Same sampling arguments and outputs as dpar.model.generation.
"""
import torch

from .generation import _labels, _next_tokens, _repeat_rows, _thresholds
from .patcher import PatchBatch


def _prefix_with_slot(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """tokens [B, t] -> [rows, t+1]: the prefix plus a dummy slot for token t (causality keeps it unseen)."""
    return _repeat_rows(torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1)], 1), rows)


def _patch_batch(per_image: list[list[int]], grid_width: int, device) -> PatchBatch:
    lengths = torch.tensor([n for image in per_image for n in image], dtype=torch.int32)
    counts = torch.tensor([len(image) for image in per_image], dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0).to(torch.int32)])
    return PatchBatch.from_lengths(lengths, cu, grid_width).to(device)


@torch.no_grad()
def generate_baseline(model, class_labels, *, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None,
                      generator=None) -> torch.Tensor:
    """LlamaGenBaseline sampling by full recomputation -> tokens int64 [B, H*W]."""
    labels = _labels(model, class_labels, cfg_scale)
    batch = labels.numel() if cfg_scale == 1.0 else labels.numel() // 2
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=labels.device)
    for t in range(model.config.tokens_per_image):
        prefix = _prefix_with_slot(tokens, labels.numel())
        logits = model(prefix, labels).view(prefix.shape[0], t + 1, -1)[:, t]
        tokens = torch.cat([tokens, _next_tokens(logits, batch, cfg_scale, sampling)[:, None]], 1)
    return tokens


@torch.no_grad()
def generate_dpar(model, class_labels, *, entropy_model, threshold, max_patch_size: int, cfg_scale=1.0,
                  temperature=1.0, top_k=None, top_p=None, generator=None) -> tuple[torch.Tensor, PatchBatch]:
    """DPAR sampling by full recomputation -> (tokens int64 [B, H*W], PatchBatch of the patches used).

    Boundaries come from the entropies of the whole prefix (recomputed every token, same rules as
    dk.entropy_patch_lengths); logits from a full DPAR forward over the prefix, whose open patch holds the
    tokens so far plus a dummy token t.
    """
    c = model.config
    labels = _labels(model, class_labels, cfg_scale)
    rows, device = labels.numel(), labels.device
    batch = rows if cfg_scale == 1.0 else rows // 2
    thresholds = _thresholds(threshold, batch, device).tolist()
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    tokens = torch.zeros(batch, 0, dtype=torch.long, device=device)
    finished, start = [[] for _ in range(batch)], [0] * batch
    for t in range(c.tokens_per_image):
        if t > 0:
            entropy = entropy_model.entropies(tokens)[:, t - 1].double().tolist()
            for b in range(batch):
                if t % c.grid_width == 0 or entropy[b] > thresholds[b] or t - start[b] == max_patch_size:
                    finished[b].append(t - start[b])
                    start[b] = t
        per_image = [finished[b] + [t + 1 - start[b]] for b in range(batch)]
        patches = _patch_batch(per_image * (rows // batch), c.grid_width, device)
        prefix = _prefix_with_slot(tokens, rows)
        logits = model(prefix, labels, patches).view(rows, t + 1, -1)[:, t]
        tokens = torch.cat([tokens, _next_tokens(logits, batch, cfg_scale, sampling)[:, None]], 1)
    final = [finished[b] + [c.tokens_per_image - start[b]] for b in range(batch)]
    return tokens, _patch_batch(final, c.grid_width, device)
