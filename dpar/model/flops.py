"""Analytic training FLOPs per step (forward + backward) of DPAR and the LlamaGen baseline.

Matmul FLOPs are 2 * rows * fan_in * fan_out; the backward of a linear layer costs 2x its forward (input and
weight gradients), so a linear layer costs 3x its forward per training step. Attention is counted from the
actual sequence lengths (dk.attended_pairs, causal exactly): forward 4 * Hq * d * pairs (QK^T and PV), backward
10 * Hq * d * pairs (five matmuls, as flash-attn), the same formulas dk.varlen_attention registers with
torch.utils.flop_counter. Norms, activations, RoPE, embeddings and gathers are not matmuls and are not counted.
"""
import torch

import dpar_kernels as dk

ATTENTION_FORWARD, ATTENTION_BACKWARD = 4, 10  # per (query, key) pair, per head and head dim
LINEAR_TRAINING = 3  # forward + backward multiples of a linear layer's forward FLOPs


class _Tally:
    """Accumulates training FLOPs per component, split into linear and attention forward FLOPs."""

    def __init__(self):
        self.components: dict[str, int] = {}
        self.linear_forward = 0
        self.attention_forward = 0

    def linear(self, component: str, rows: int, fan_in: int, fan_out: int) -> None:
        flops = 2 * rows * fan_in * fan_out
        self.linear_forward += flops
        self.components[component] = self.components.get(component, 0) + LINEAR_TRAINING * flops

    def attention(self, component: str, heads: int, head_dim: int, pairs: int) -> None:
        self.attention_forward += ATTENTION_FORWARD * heads * head_dim * pairs
        training = (ATTENTION_FORWARD + ATTENTION_BACKWARD) * heads * head_dim * pairs
        self.components[component] = self.components.get(component, 0) + training

    def block(self, component: str, config, rows: int, pairs: int) -> None:
        """One transformer Block over ``rows`` rows whose causal attention covers ``pairs`` pairs."""
        c, inner = config, config.num_heads * config.head_dim
        self.linear(component, rows, c.width, inner + 2 * c.num_kv_heads * c.head_dim)
        self.linear(component, rows, inner, c.width)
        for _ in range(3):
            self.linear(component, rows, c.width, c.mlp_hidden)
        self.attention(component, c.num_heads, c.head_dim, pairs)

    def result(self) -> dict:
        attention_backward = self.attention_forward * ATTENTION_BACKWARD // ATTENTION_FORWARD
        forward = self.linear_forward + self.attention_forward
        backward = (LINEAR_TRAINING - 1) * self.linear_forward + attention_backward
        return {**self.components, "forward": forward, "backward": backward, "total": forward + backward}


def _dense_pairs(batch: int, length: int) -> int:
    cu = torch.arange(batch + 1, dtype=torch.int32) * length
    return dk.attended_pairs(cu, cu, True)


def dpar_training_flops(config, patches) -> dict:
    """Training FLOPs of one DPAR step on ``patches`` (a PatchBatch). Returns a dict of components
    (encoder, patch_embed, global, decoder, head; each forward+backward) plus forward, backward, total and
    global_tokens (P + B rows of the global transformer)."""
    c, tally = config, _Tally()
    tokens, num_patches, batch = patches.num_tokens, patches.num_patches, patches.num_images
    token_pairs = _dense_pairs(batch, patches.tokens_per_image)
    for _ in range(c.encoder_layers):
        tally.block("encoder", c, tokens, token_pairs)
    inner, kv_inner = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    tally.linear("patch_embed", num_patches, c.width, inner)
    tally.linear("patch_embed", tokens, c.width, 2 * kv_inner)
    tally.linear("patch_embed", num_patches, inner, c.width)
    for _ in range(3 if c.refiner_mlp else 0):  # the refiner's SwiGLU
        tally.linear("patch_embed", num_patches, c.width, c.mlp_hidden)
    tally.attention("patch_embed", c.num_heads, c.head_dim, tokens)  # each patch query sees its own tokens
    global_cu = patches.cu_global.cpu()
    global_pairs = dk.attended_pairs(global_cu, global_cu, True)
    for _ in range(c.global_layers):
        tally.block("global", c, num_patches + batch, global_pairs)
    tally.linear("decoder", num_patches, c.width, c.decoder_layers * c.width)
    for _ in range(c.decoder_layers):
        tally.block("decoder", c, tokens, token_pairs)
    tally.linear("head", tokens, c.width, c.vocab_size)
    return {**tally.result(), "global_tokens": num_patches + batch}


def baseline_training_flops(config, batch_size: int, tokens_per_image: int | None = None) -> dict:
    """Training FLOPs of one LlamaGen baseline step on ``batch_size`` images ([class] + T-1 tokens each).
    Returns components (layers, head), forward, backward, total and global_tokens (B*T rows)."""
    c, tally = config, _Tally()
    length = c.tokens_per_image if tokens_per_image is None else tokens_per_image
    rows, pairs = batch_size * length, _dense_pairs(batch_size, length)
    for _ in range(c.total_layers):
        tally.block("layers", c, rows, pairs)
    tally.linear("head", rows, c.width, c.vocab_size)
    return {**tally.result(), "global_tokens": rows}
