"""Per-layer KV cache for batched incremental decoding with dk.kvcache_attention (no host reads).

Each step appends one token to every row, to a chosen subset of rows (the global step of the images that start
a patch), or to the rows of a mask (an out-of-step local step: every row computes, the active ones append). A
subset or masked step runs the attention over every row with the new keys in place: the rows that do not append
write a key at their current length, which stays invisible (their length does not move) and is overwritten by
their next real append. Appends past the capacity are dropped by the kernel, never written.
"""
import torch

import dpar_kernels as dk


class KVCache:
    """Keys/values [layers, rows, capacity, kv_heads, head_dim]; lengths int32 [rows] (tokens cached)."""

    def __init__(self, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, capacity, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.capacity = batch, capacity
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self._rows = self._active = None
        self._step_open = False

    def begin(self, rows: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """Prepares a step appending one token to each of ``rows`` (int64 [n] row indices, distinct, in the
        order of the step's queries), or, with every row querying, to the rows where ``active`` (bool [batch]) is
        True, or to every row when both are None."""
        if rows is not None and active is not None:
            raise ValueError("KVCache.begin takes rows or active, not both")
        self._rows, self._active, self._step_open = rows, active, True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [n, Hq, d], k/v [n, Hk, d]: the new tokens of this step -> attention output [n, Hq, d]."""
        if self._rows is not None:
            q, k, v = (self._scatter(t) for t in (q, k, v))
        out = dk.kvcache_attention(q[:, None], self.k[layer], self.v[layer], self.lengths,
                                   k[:, None].to(self.k.dtype), v[:, None].to(self.v.dtype))[:, 0]
        return out if self._rows is None else out.index_select(0, self._rows)

    def _scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[n, ...] rows of the step -> [batch, ...] with zeros for the rows that do not append."""
        return x.new_zeros(self.batch, *x.shape[1:]).index_copy_(0, self._rows, x)

    def commit(self) -> None:
        """Ends the step begun by begin(): the appended tokens become part of the cache."""
        if not self._step_open:
            raise RuntimeError("KVCache.commit() without begin()")
        if self._rows is not None:
            self.lengths.index_add_(0, self._rows, torch.ones_like(self._rows, dtype=torch.int32))
        elif self._active is not None:
            self.lengths += self._active.int()
        else:
            self.lengths += 1
        self._rows = self._active = None
        self._step_open = False
