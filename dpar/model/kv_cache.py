"""Per-layer KV cache for batched incremental decoding with dk.varlen_attention (no copies, no padding math).

Sequence b owns slots [b * capacity, (b + 1) * capacity) of a flat buffer. Each attention call packs the live
keys of every sequence by describing the unused tail of each slot as an extra key sequence with zero queries,
so the buffer is passed as is: cu_seqlens_k = [0, len_0, cap, cap + len_1, 2 cap, ...]. New queries are
bottom-right aligned (causal=True), so they see the whole cache plus the new tokens before them.
"""
import torch

import dpar_kernels as dk


class KVCache:
    """Keys/values [layers, batch * capacity, kv_heads, head_dim]; lengths int64 [batch] (tokens cached)."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch * capacity, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.capacity = batch, capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._step = None

    def begin(self, counts: torch.Tensor) -> None:
        """Prepares a step that appends counts[b] >= 0 tokens (int64 [batch]) to sequence b, in packed order."""
        counts = counts.to(device=self.lengths.device, dtype=torch.long)
        new_lengths = self.lengths + counts
        if bool((new_lengths > self.capacity).any()):
            raise ValueError(f"KV cache overflow: capacity {self.capacity} per sequence")
        base = torch.arange(self.batch, device=counts.device) * self.capacity
        cu_q_real = torch.cumsum(counts, 0) - counts  # offset of each sequence's new tokens in the packed step
        batch_of = torch.repeat_interleave(torch.arange(self.batch, device=counts.device), counts)
        within = torch.arange(batch_of.numel(), device=counts.device) - cu_q_real[batch_of]
        slots = base[batch_of] + self.lengths[batch_of] + within
        cu_k = torch.stack([base + new_lengths, base + self.capacity], dim=1).reshape(-1)
        cu_q = torch.stack([cu_q_real + counts, cu_q_real + counts], dim=1).reshape(-1)
        zero = torch.zeros(1, dtype=torch.int32, device=counts.device)
        self._step = (slots, torch.cat([zero, cu_q.to(torch.int32)]), torch.cat([zero, cu_k.to(torch.int32)]),
                      int(counts.max()) if counts.numel() else 0, new_lengths)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [n, Hq, d], k/v [n, Hk, d]: the new tokens of this step -> attention output [n, Hq, d]."""
        slots, cu_q, cu_k, max_q, _ = self._step
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))
        return dk.varlen_attention(q, self.k[layer], self.v[layer], cu_q, cu_k, max_q, self.capacity, causal=True)

    def commit(self) -> None:
        """Ends the step begun by begin(): the appended tokens become part of the cache."""
        self.lengths = self._step[4]
        self._step = None
