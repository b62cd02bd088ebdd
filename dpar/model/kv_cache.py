"""Per-layer KV cache for batched incremental decoding with dk.kvcache_attention (no host reads).

Each step appends one token to every row, to the rows of a mask (static shapes: every row computes, the active
ones append) or to a chosen subset of rows (only those rows compute). A masked step runs the attention over every
row with the new keys in place: the rows that do not append write a key at their current length, which stays
invisible (their length does not move) and is overwritten by their next real append; appends past the capacity are
dropped by the kernel, never written. A subset step writes its rows' new keys first, then runs the attention with
every other row seeing no key (no work for them), so its cost follows its rows; each row's result is the one a
full step gives it (the kernel computes each row on its own: tests/model/test_schedule.py).
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
        self._rows = self._active = self._appended = self._visible = None
        self._step_open = False

    def begin(self, rows: torch.Tensor | None = None, active: torch.Tensor | None = None) -> None:
        """Prepares a step appending one token to each of ``rows`` (int64 [n] row indices, distinct, in the
        order of the step's queries; never past the capacity), or, with every row querying, to the rows where
        ``active`` (bool [batch]) is True, or to every row when both are None."""
        if rows is not None and active is not None:
            raise ValueError("KVCache.begin takes rows or active, not both")
        self._rows, self._active, self._step_open = rows, active, True
        if rows is not None:
            self._appended = self.lengths.index_select(0, rows).long()  # where the rows' new tokens go
            self._visible = torch.zeros_like(self.lengths).index_copy_(0, rows, self._appended.int() + 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [n, Hq, d], k/v [n, Hk, d]: the new tokens of this step -> attention output [n, Hq, d]."""
        if self._rows is None:
            return dk.kvcache_attention(q[:, None], self.k[layer], self.v[layer], self.lengths,
                                        k[:, None].to(self.k.dtype), v[:, None].to(self.v.dtype))[:, 0]
        index = (torch.full_like(self._rows, layer), self._rows, self._appended)  # whole-cache index: a compiled
        self.k.index_put_(index, k.to(self.k.dtype))  # step writes in place (into a view it would copy the cache)
        self.v.index_put_(index, v.to(self.v.dtype))
        queries = q.new_zeros(self.batch, *q.shape[1:]).index_copy_(0, self._rows, q)
        out = dk.kvcache_attention(queries[:, None], self.k[layer], self.v[layer], self._visible)[:, 0]
        return out.index_select(0, self._rows)

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
        self._rows = self._active = self._appended = self._visible = None
        self._step_open = False
