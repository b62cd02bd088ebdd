"""Transformer building blocks over packed (ragged) rows: every attention goes through dk.varlen_attention.

Row tensors are [N, D] (all sequences of a batch packed); sequences are described by int32 cu_seqlens [B+1].
"""
import torch
from torch import nn

import dpar_kernels as dk


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """x [N, D] -> w2(silu(w1 x) * w3 x) [N, D]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = dk.Linear(dim, hidden, bias=False)
        self.w3 = dk.Linear(dim, hidden, bias=False)
        self.w2 = dk.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class AxialRope(nn.Module):
    """RoPE over several position axes: the head_dim/2 rotary pairs are split into one group per axis.

    2 axes (row, col) give the 2D token-grid RoPE; 3 axes (row, col_start, col_end) give the patch RoPE.
    ``shares`` (one int per axis, default equal) split the pairs in proportion, the remainder going to the first
    axes: shares (2, 1, 1) give the row half of the pairs and each column axis a quarter.
    Position 0 on every axis is the identity rotation (used for the class token, as in LlamaGen).
    """

    def __init__(self, head_dim: int, axes: int, base: float = 10000.0, shares: tuple[int, ...] | None = None):
        super().__init__()
        pairs, shares = head_dim // 2, shares or (1,) * axes
        if len(shares) != axes or min(shares) < 1:
            raise ValueError(f"shares must be {axes} positive ints, got {shares}")
        sizes = [pairs * share // sum(shares) for share in shares]
        sizes = [n + (1 if a < pairs - sum(sizes) else 0) for a, n in enumerate(sizes)]
        if min(sizes) < 1:
            raise ValueError(f"head_dim {head_dim} has too few rotary pairs for {axes} axes")
        self.sizes, self.base, self.axes = sizes, base, axes
        # Tables built once (a decode step calls forward per token; building them there cost ~15 small ops and, on
        # a GPU, a host-to-device copy per call): the frequency of each pair, kept as the int64 bits of its float64
        # value so that casting the model (.half(), .to(bf16)) never rounds it, and the axis of each pair. Built on
        # the CPU even under a meta device context; buffers follow the model's .to(device); not persistent (they
        # derive from the config, checkpoints stay as they were).
        cpu = dict(dtype=torch.float64, device="cpu")
        freqs = torch.cat([base ** (-torch.arange(n, **cpu) / n) for n in sizes])
        axis_of_pair = torch.cat([torch.full((n,), a, dtype=torch.long, device="cpu") for a, n in enumerate(sizes)])
        self.register_buffer("freq_bits", freqs.view(torch.int64), persistent=False)
        self.register_buffer("axis_of_pair", axis_of_pair, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """positions [N, axes] integer -> rotations [N, head_dim/2], complex (complex128 for float64 ``dtype``,
        else complex64: apply_rope rotates in at least fp32). Angles in float64, so casting the model to half
        precision never rounds the frequencies."""
        if positions.dim() != 2 or positions.shape[1] != self.axes:
            raise ValueError(f"positions must be [N, {self.axes}], got {tuple(positions.shape)}")
        angles = positions.to(torch.float64)[:, self.axis_of_pair] * self.freq_bits.view(torch.float64)
        real = torch.promote_types(dtype, torch.float32)
        return torch.complex(angles.cos().to(real), angles.sin().to(real))


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [N, H, d], rope [N, d/2] complex rotations (AxialRope): rotates each adjacent pair (x[2i], x[2i+1]) as
    one complex multiplication, (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos), one op forward and backward.

    The rotation runs in at least fp32 and the result has x's dtype, so under autocast q and k stay in the
    dtype of v (bf16/fp16 q, k with fp32 tables would otherwise be promoted to fp32)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    pairs = torch.view_as_complex(x.to(compute).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope[:, None, :]).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention over packed sequences, GQA capable, with RoPE and an optional KV cache."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, width // num_heads
        self.qkv = dk.Linear(width, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.out = dk.Linear(num_heads * self.head_dim, width, bias=False)

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, cache=None):
        """x [N, D]; rope [N, d/2] complex (AxialRope); either cu_seqlens int32 [B+1] + max_seqlen (training) or
        cache = (KVCache, layer) after KVCache.begin (incremental). Returns [N, D]."""
        qkv = self.qkv(x).unflatten(-1, (-1, self.head_dim))
        rotated = self.num_heads + self.num_kv_heads
        q, k = apply_rope(qkv[:, :rotated], rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, rotated:]
        if cache is None:
            out = dk.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      causal=True)
        else:
            kv_cache, layer = cache
            out = kv_cache.attend(layer, q, k, v)
        return self.out(out.flatten(1))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop(attn(norm x)), then + drop(mlp(norm x)) (LlamaGen's resid_dropout and
    ffn_dropout; identity at 0 and in eval mode)."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, eps: float,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(width, eps), RMSNorm(width, eps)
        self.attn = Attention(width, num_heads, num_kv_heads)
        self.mlp = SwiGLU(width, mlp_hidden)
        self.resid_dropout, self.ffn_dropout = nn.Dropout(resid_dropout), nn.Dropout(ffn_dropout)

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, cache=None):
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), rope, cu_seqlens, max_seqlen, cache))
        return x + self.ffn_dropout(self.mlp(self.mlp_norm(x)))


class Stack(nn.Module):
    """``layers`` Blocks applied in order; layer i uses KV-cache layer ``cache_offset + i``."""

    def __init__(self, layers: int, width: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, eps: float,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, num_heads, num_kv_heads, mlp_hidden, eps, resid_dropout, ffn_dropout)
                                    for _ in range(layers))

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, cache=None):
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cu_seqlens, max_seqlen, None if cache is None else (cache, i))
        return x


def stack_from(config, layers: int) -> Stack:
    """A Stack sized by ``config`` (dropouts from its resid_dropout / ffn_dropout where it has them)."""
    return Stack(layers, config.width, config.num_heads, config.num_kv_heads, config.mlp_hidden, config.norm_eps,
                 *dropouts_of(config))


def dropouts_of(config) -> tuple[float, float]:
    """(resid_dropout, ffn_dropout) of a config; 0 for configs without them (the entropy model's)."""
    return getattr(config, "resid_dropout", 0.0), getattr(config, "ffn_dropout", 0.0)


class PatchRefiner(nn.Module):
    """Refines each patch's initial vector by cross-attention to its own tokens, then (``mlp``) a SwiGLU MLP;
    both residual branches pass ``resid_dropout`` / ``ffn_dropout``.

    patches [P, D] (one query per patch), tokens [N, D] packed, cu_tokens int32 [P+1] -> [P, D].
    """

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, eps: float, mlp: bool = True,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, width // num_heads
        self.query_norm, self.token_norm = RMSNorm(width, eps), RMSNorm(width, eps)
        self.q = dk.Linear(width, num_heads * self.head_dim, bias=False)
        self.kv = dk.Linear(width, 2 * num_kv_heads * self.head_dim, bias=False)
        self.out = dk.Linear(num_heads * self.head_dim, width, bias=False)
        self.resid_dropout, self.ffn_dropout = nn.Dropout(resid_dropout), nn.Dropout(ffn_dropout)
        self.mlp_norm, self.mlp = (RMSNorm(width, eps), SwiGLU(width, mlp_hidden)) if mlp else (None, None)

    def forward(self, patches, tokens, cu_tokens, max_patch_length: int):
        num_patches = patches.shape[0]
        q = self.q(self.query_norm(patches)).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = self.token_keys_values(tokens).unbind(1)
        cu_queries = dk.mark_validated(torch.arange(num_patches + 1, dtype=torch.int32, device=patches.device),
                                       num_patches, 1)
        attended = dk.varlen_attention(q, k, v, cu_queries, cu_tokens, 1, max_patch_length, causal=False)
        return self._output(patches, attended)

    def token_keys_values(self, tokens):
        """tokens [..., D] -> their cross-attention keys and values [..., 2, Hk, d] (incremental decoding computes
        them once per token, as it samples it)."""
        return self.kv(self.token_norm(tokens)).unflatten(-1, (2, self.num_kv_heads, self.head_dim))

    def forward_padded(self, patches, keys_values, lengths):
        """forward for patches padded to L tokens (incremental decoding, no host read): patches [P, D],
        keys_values [P, L, 2, Hk, d] (token_keys_values of the tokens; patch p's first lengths[p] count), lengths
        int32 [P] -> [P, D]."""
        q = self.q(self.query_norm(patches)).unflatten(-1, (self.num_heads, self.head_dim))
        k, v = keys_values.unbind(2)
        attended = dk.kvcache_attention(q[:, None], k, v, lengths, causal=False)[:, 0]
        return self._output(patches, attended)

    def _output(self, patches, attended):
        patches = patches + self.resid_dropout(self.out(attended.flatten(1)))
        if self.mlp is None:
            return patches
        return patches + self.ffn_dropout(self.mlp(self.mlp_norm(patches)))


def init_weights(module: nn.Module, std: float) -> None:
    """LlamaGen init: normal(0, std) for Linear and Embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def grid_positions(token_index: torch.Tensor, grid_width: int) -> torch.Tensor:
    """token_index [N] (raster index inside its image) -> int64 [N, 2] (row, col)."""
    token_index = token_index.long()
    return torch.stack([token_index // grid_width, token_index % grid_width], dim=1)


def dense_cu_seqlens(batch: int, length: int, device) -> torch.Tensor:
    """int32 [batch+1] offsets of ``batch`` packed sequences of equal ``length`` (marked valid: no op reads
    them back)."""
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
    return dk.mark_validated(cu, batch * length, length)
