"""LlamaGen baseline: the same blocks as DPAR at token level (every patch one token).

A plain causal transformer over [class token] + tokens with 2D RoPE and encoder+global+decoder layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import dpar_kernels as dk

from . import flops
from .blocks import AxialRope, RMSNorm, dense_cu_seqlens, grid_positions, init_weights, stack_from
from .conditioning import ClassEmbedding, check_tokens_labels
from .config import ModelConfig
from .entropy_model import EntropyModel
from .kv_cache import KVCache
from .patcher import PatchBatch


class LlamaGenBaseline(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.class_embed = ClassEmbedding(c.num_classes, c.width, c.class_dropout)
        self.rope = AxialRope(c.head_dim, 2, c.rope_base)
        self.layers = stack_from(c, c.total_layers)
        self.norm = RMSNorm(c.width, c.norm_eps)
        self.head = dk.Linear(c.width, c.vocab_size, bias=False)
        self.token_dropout = nn.Dropout(c.token_dropout)  # on the input rows (training only)
        init_weights(self, c.init_std)
        if c.zero_init_head:
            nn.init.zeros_(self.head.weight)

    def positions(self, sequence_index: torch.Tensor) -> torch.Tensor:
        """Index in [class, token_0, ...] -> (row, col) [N, 2]; the class token (index 0) gets (0, 0).

        A where, not clamp(min=0): inductor (torch 2.13, CPU) fails on the clamp of an in-graph arange minus one
        ("vr must not be None"), which made `dpar train baseline --compile` fail."""
        token = torch.where(sequence_index > 0, sequence_index - 1, 0)
        return grid_positions(token, self.config.grid_width)

    def run(self, rows: torch.Tensor, sequence_index: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
            max_seqlen: int | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """rows [N, D] at sequence positions [N] -> logits [N, V] (row i predicts the token after it)."""
        rope = self.rope(self.positions(sequence_index), rows.dtype)
        return self.head(self.norm(self.layers(rows, rope, cu_seqlens, max_seqlen, cache)))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, patches: PatchBatch | None = None) -> torch.Tensor:
        """tokens int64 [B, T], labels int64 [B] -> logits [B*T, V] (row b*T+t predicts tokens[b, t]).
        ``patches`` is ignored (every token is its own patch)."""
        check_tokens_labels(self.config, tokens, labels)
        batch, length = tokens.shape
        # the last token predicts nothing, so the sequence is [class, token_0 .. token_{T-2}]
        rows = torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens[:, :-1])], dim=1)
        index = torch.arange(length, device=tokens.device).repeat(batch)
        rows = self.token_dropout(rows.reshape(batch * length, -1))
        return self.run(rows, index, dense_cu_seqlens(batch, length, tokens.device), length)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
             patches: PatchBatch | None = None) -> torch.Tensor:
        """Mean token cross-entropy (scalar). Every model's loss has this signature; the baseline needs ``labels``
        and ignores ``patches`` (every token is its own patch)."""
        if labels is None:
            raise ValueError("LlamaGenBaseline.loss needs labels (int64 [B])")
        logits = self.forward(tokens, labels)
        return nn.functional.cross_entropy(logits.float(), tokens.reshape(-1))

    def training_flops(self, tokens: torch.Tensor, patches: PatchBatch | None = None) -> float:
        """Analytic FLOPs of one training step (forward + backward) on ``tokens.shape[0]`` images (dpar.flops);
        ``patches`` is ignored."""
        return float(flops.baseline_training_flops(self.config, tokens.shape[0])["total"])

    def generate(self, class_labels: torch.Tensor | Sequence[int], *, entropy_model: EntropyModel | None = None,
                 threshold: float | torch.Tensor | None = None, max_patch_size: int | None = None,
                 cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, return_patches: bool = False,
                 compile: bool | str = False, schedule="out_of_step") -> torch.Tensor | tuple[torch.Tensor, None]:
        """Samples token grids int64 [B, H*W] with a KV cache; see dpar.model.generation.generate_baseline.
        compile=True runs the per-token step as one torch.compile graph (same tokens; a str picks the mode).
        Every model's generate has this signature: ``entropy_model``, ``threshold``, ``max_patch_size`` and
        ``schedule`` are ignored (every token is its own patch: one step per token), and return_patches=True returns
        (tokens, None)."""
        from .generation import generate_baseline
        tokens = generate_baseline(self, class_labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                   top_p=top_p, generator=generator, compile=compile)
        return (tokens, None) if return_patches else tokens
