"""DPAR: token encoder -> patch embedding -> global causal transformer over patches -> token decoder.

Training is fully packed: B images of T tokens are [B*T] token rows; their P patches are [P] rows; the global
sequences [class token] + patches of each image are [P+B] rows (offsets patches.cu_global). No padding.

Causality: the decoder predicts token t from the encoder state of token t-1 (which has seen tokens <= t-1) and
from the global output just before t's patch p (which has seen the class and patches < p, i.e. tokens before
p's first token <= t). Patch boundaries themselves depend only on earlier tokens (entropy H_{t-1}).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import dpar_kernels as dk

from . import flops
from .blocks import (
    AxialRope,
    Block,
    PatchRefiner,
    RMSNorm,
    dense_cu_seqlens,
    dropouts_of,
    grid_positions,
    init_weights,
    stack_from,
)
from .conditioning import ClassEmbedding, check_tokens_labels
from .config import PATCH_ROPE_SPLITS, ModelConfig
from .entropy_model import EntropyModel
from .kv_cache import KVCache
from .patcher import PatchBatch


class DPAR(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.class_embed = ClassEmbedding(c.num_classes, c.width, c.class_dropout)
        self.token_rope = AxialRope(c.head_dim, 2, c.rope_base)
        self.patch_rope = AxialRope(c.head_dim, 3, c.rope_base, PATCH_ROPE_SPLITS[c.patch_rope_split])
        self.encoder = stack_from(c, c.encoder_layers)
        self.refiner = PatchRefiner(c.width, c.num_heads, c.num_kv_heads, c.mlp_hidden, c.norm_eps, c.refiner_mlp,
                                    *dropouts_of(c))
        self.token_dropout = nn.Dropout(c.token_dropout)  # on the global input rows (training only)
        self.global_stack = stack_from(c, c.global_layers)
        self.global_norm = RMSNorm(c.width, c.norm_eps)
        self.decoder_start = nn.Parameter(torch.zeros(c.width))
        self.decoder_condition = dk.Linear(c.width, c.decoder_layers * c.width, bias=False)
        self.decoder = nn.ModuleList(Block(c.width, c.num_heads, c.num_kv_heads, c.mlp_hidden, c.norm_eps,
                                           *dropouts_of(c)) for _ in range(c.decoder_layers))
        self.norm = RMSNorm(c.width, c.norm_eps)
        self.head = dk.Linear(c.width, c.vocab_size, bias=False)
        init_weights(self, c.init_std)
        nn.init.normal_(self.decoder_start, std=c.init_std)
        if c.zero_init_head:
            nn.init.zeros_(self.head.weight)

    # pieces shared by training and generation
    def embed_patches(self, token_states: torch.Tensor, cu_tokens: torch.Tensor,
                      max_patch_length: int) -> torch.Tensor:
        """Encoder states [N, D] of packed patches -> patch vectors [P, D]: max-pool, then cross-attention."""
        pooled = dk.patch_gather(token_states, cu_tokens, reduce="max")
        return self.refiner(pooled, token_states, cu_tokens, max_patch_length)

    def embed_padded_patches(self, token_states: torch.Tensor, keys_values: torch.Tensor,
                             lengths: torch.Tensor) -> torch.Tensor:
        """embed_patches for patches padded to L tokens by repeating their own tokens (incremental decoding):
        token_states [P, L, D], keys_values [P, L, 2, Hk, d] (refiner.token_keys_values of those states), lengths
        int32 [P] (real tokens of each) -> patch vectors [P, D]; no host read."""
        return self.refiner.forward_padded(token_states.amax(1), keys_values, lengths)

    def run_global(self, rows: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                   max_seqlen: int | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Global rows [G, D] with (row, col_start, col_end) positions [G, 3] -> normed outputs [G, D]."""
        rope = self.patch_rope(positions, rows.dtype)
        return self.global_norm(self.global_stack(rows, rope, cu_seqlens, max_seqlen, cache))

    def decode(self, inputs: torch.Tensor, condition: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """inputs [N, D] (encoder state of the previous token), condition [N, layers*D] -> logits [N, V]."""
        h = inputs
        for i, (block, cond) in enumerate(zip(self.decoder, condition.chunk(len(self.decoder), dim=1))):
            h = block(h + cond, rope, cu_seqlens, max_seqlen, None if cache is None else (cache, i))
        return self.head(self.norm(h))

    # training
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, patches: PatchBatch) -> torch.Tensor:
        """tokens int64 [B, T], labels int64 [B], patches of those tokens -> logits [B*T, V] (row b*T+t
        predicts tokens[b, t])."""
        check_tokens_labels(self.config, tokens, labels)
        batch, length = tokens.shape
        if patches.num_images != batch or patches.tokens_per_image != length:
            raise ValueError(f"patches describe {patches.num_images} images of {patches.tokens_per_image} tokens, "
                             f"tokens is [{batch}, {length}]")
        if patches.grid_width != self.config.grid_width:
            raise ValueError(f"patches.grid_width={patches.grid_width} != config.grid_width")
        x = self.token_embed(tokens.reshape(-1))
        token_index = torch.arange(length, device=tokens.device).repeat(batch)
        rope = self.token_rope(grid_positions(token_index, self.config.grid_width), x.dtype)
        cu_images = dense_cu_seqlens(batch, length, tokens.device)
        states = self.encoder(x, rope, cu_images, length)
        patch_vectors = self.embed_patches(states, patches.cu_tokens, patches.max_patch_length)

        # global sequences [class, patch_0 .. patch_{n-1}] per image, packed
        patch_rows = patches.patch_rows.long()
        class_rows = patches.cu_global[:-1].long()
        rows = x.new_zeros(patches.num_patches + batch, x.shape[1])
        rows = rows.index_copy(0, class_rows, self.class_embed(labels)).index_copy(0, patch_rows, patch_vectors)
        positions = torch.zeros(rows.shape[0], 3, dtype=torch.long, device=x.device)
        positions[patch_rows] = patches.positions.long()
        global_out = self.run_global(self.token_dropout(rows), positions, patches.cu_global, patches.max_global_length)
        before_patch = global_out.index_select(0, patch_rows - 1)  # output that has seen patches < p
        condition = dk.patch_scatter(self.decoder_condition(before_patch), patches.cu_tokens,
                                     total_tokens=batch * length)

        shifted = torch.cat([self.decoder_start.expand(batch, 1, -1).to(x.dtype),
                             states.view(batch, length, -1)[:, :-1]], dim=1).reshape(batch * length, -1)
        return self.decode(shifted, condition, rope, cu_images, length)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
             patches: PatchBatch | None = None) -> torch.Tensor:
        """Mean token cross-entropy (scalar). Every model's loss has this signature; DPAR needs ``labels`` and
        ``patches`` (ValueError without them)."""
        if labels is None or patches is None:
            raise ValueError("DPAR.loss needs labels (int64 [B]) and patches (a PatchBatch of the tokens)")
        logits = self.forward(tokens, labels, patches)
        return nn.functional.cross_entropy(logits.float(), tokens.reshape(-1))

    def training_flops(self, tokens: torch.Tensor, patches: PatchBatch | None = None) -> float:
        """Analytic FLOPs of one training step (forward + backward) on ``patches`` (dpar.flops); ``tokens`` is
        not read (the patches give the shapes)."""
        if patches is None:
            raise ValueError("DPAR.training_flops needs patches (a PatchBatch)")
        return float(flops.dpar_training_flops(self.config, patches)["total"])

    def generate(self, class_labels: torch.Tensor | Sequence[int], *, entropy_model: EntropyModel | None = None,
                 threshold: float | torch.Tensor | None = None, max_patch_size: int | None = None,
                 cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, return_patches: bool = False,
                 compile: bool | str = False, schedule="out_of_step") -> torch.Tensor | tuple[torch.Tensor, PatchBatch]:
        """Samples token grids int64 [B, H*W] with KV caches; see dpar.model.generation.generate_dpar.
        With return_patches=True returns (tokens, PatchBatch of the patches used). compile=True runs the per-token
        step as one torch.compile graph (same tokens; a str picks the torch.compile mode). ``schedule``:
        "out_of_step" (default) or "lockstep" (dpar.model.schedule; the same tokens). Every model's generate
        has this signature; DPAR needs ``entropy_model``, ``threshold`` and ``max_patch_size`` (ValueError)."""
        if entropy_model is None or threshold is None or max_patch_size is None:
            raise ValueError("DPAR.generate needs entropy_model, threshold and max_patch_size")
        from .generation import generate_dpar
        tokens, patches = generate_dpar(self, class_labels, entropy_model=entropy_model, threshold=threshold,
                                        max_patch_size=max_patch_size, cfg_scale=cfg_scale,
                                        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                        schedule=schedule, compile=compile)
        return (tokens, patches) if return_patches else tokens
