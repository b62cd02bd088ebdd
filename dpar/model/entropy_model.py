"""The entropy model: a small unconditional token-level causal GPT over raster-ordered VQ tokens."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dpar_kernels as dk

from .blocks import AxialRope, RMSNorm, dense_cu_seqlens, grid_positions, init_weights, stack_from
from .config import EntropyConfig
from .kv_cache import KVCache
from .patcher import PatchBatch


class EntropyModel(nn.Module):
    """Output i predicts token i+1; H_i = entropy of that prediction (nats)."""

    def __init__(self, config: EntropyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.rope = AxialRope(config.head_dim, 2, config.rope_base)
        self.layers = stack_from(config, config.layers)
        self.norm = RMSNorm(config.width, config.norm_eps)
        self.head = dk.Linear(config.width, config.vocab_size, bias=False)
        init_weights(self, config.init_std)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            raise TypeError("tokens must be an int64 tensor [B, T]")
        if tokens.shape[1] > self.config.tokens_per_image:
            raise ValueError(f"tokens has {tokens.shape[1]} > {self.config.tokens_per_image} tokens per image")

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, T] -> final normed hidden states [B*T, D] (packed)."""
        self._check_tokens(tokens)
        batch, length = tokens.shape
        x = self.embed(tokens.reshape(-1))
        index = torch.arange(length, device=tokens.device).repeat(batch)
        rope = self.rope(grid_positions(index, self.config.grid_width), x.dtype)
        x = self.layers(x, rope, dense_cu_seqlens(batch, length, tokens.device), length)
        return self.norm(x)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
             patches: PatchBatch | None = None) -> torch.Tensor:
        """Mean cross-entropy (scalar) of predicting tokens[:, 1:] from their prefixes. Every model's loss has this
        signature; this model is unconditional and token-level, so ``labels`` and ``patches`` are ignored."""
        batch, length = tokens.shape
        hidden = self.hidden(tokens).unflatten(0, (batch, length))[:, :-1]
        logits = self.head(hidden.reshape(-1, hidden.shape[-1]))
        return nn.functional.cross_entropy(logits.float(), tokens[:, 1:].reshape(-1))

    def training_flops(self, tokens: torch.Tensor, patches: PatchBatch | None = None) -> float:
        """FLOPs of one training step (forward + backward) on a batch shaped like ``tokens``: counted by
        FlopCounterMode on a fresh copy, once per batch shape and device (``patches`` is ignored)."""
        return _counted_training_flops(self.config, tuple(tokens.shape), tokens.device)

    @torch.no_grad()
    def entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, T] -> float32 [B, T]: H_i, entropy of the prediction of token i+1."""
        batch, length = tokens.shape
        return dk.linear_entropy(self.hidden(tokens), self.head.weight).reshape(batch, length)

    # incremental decoding (generation)
    def new_cache(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        c = self.config
        return KVCache(c.layers, batch, c.tokens_per_image, c.num_kv_heads, c.head_dim, dtype, device)

    @torch.no_grad()
    def step(self, cache: KVCache, tokens: torch.Tensor, active: torch.Tensor | None = None,
             rows: torch.Tensor | None = None) -> torch.Tensor:
        """Appends one token per image (int64 [B]; only where ``active``, bool [B], is True when given: each image
        at its own position), or, with ``rows`` (int64 [n]), one token to each of those images only (tokens [n])
        -> float32 [B] (or [n]): entropy of the prediction of the next."""
        x = self.embed(tokens)
        index = (cache.lengths if rows is None else cache.lengths.index_select(0, rows)).long()
        cache.begin(rows, active)
        x = self.layers(x, self.rope(grid_positions(index, self.config.grid_width), x.dtype), cache=cache)
        cache.commit()
        return dk.linear_entropy(self.norm(x), self.head.weight)


@functools.lru_cache(maxsize=8)
def _counted_training_flops(config: EntropyConfig, shape: tuple[int, int], device: torch.device) -> float:
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation leaves the caller's random stream alone
        probe = EntropyModel(config).to(device)
    with FlopCounterMode(display=False) as counter:
        probe.loss(torch.zeros(shape, dtype=torch.long, device=device)).backward()
    return float(counter.get_total_flops())
