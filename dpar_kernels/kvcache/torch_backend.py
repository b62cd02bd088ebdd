"""The "torch" backend of kvcache_attention: the new keys scattered into the caches (B x Sq rows, not a rewrite of the
whole cache) and torch's scaled_dot_product_attention over the cache with a per-row length mask (GQA by
enable_gqa). naive.py is the reference; both share its semantics (visible_ends) and never read cache_seqlens on the
host. Shapes: q [B, Sq, Hq, d]; caches [B, S_max, Hk, d]; cache_seqlens int32 [B]; k, v [B, Sq, Hk, d] or None.
"""
import torch
import torch.nn.functional as F

from .naive import visible_ends


def _write_plan(cache_seqlens: torch.Tensor, seqlen_q: int, max_keys: int):
    """Where new row i of each batch row goes: (rows [B, Sq], positions [B, Sq] clamped into the cache, kept [B, Sq]:
    below S_max, last_source [B]: the new row that lands on position S_max - 1, last_written [B])."""
    device = cache_seqlens.device
    cached = cache_seqlens.long().clamp(0, max_keys)
    position = cached[:, None] + torch.arange(seqlen_q, device=device)
    last_source = max_keys - 1 - cached
    rows = torch.arange(cached.numel(), device=device)
    return (rows[:, None].expand(-1, seqlen_q), position.clamp(max=max_keys - 1), position < max_keys,
            last_source.clamp(0, seqlen_q - 1), (last_source >= 0) & (last_source < seqlen_q))


def _write(cache: torch.Tensor, new: torch.Tensor, plan) -> None:
    """cache[b, cached_b + i] = new[b, i] below S_max, in place, as one index_put of B x Sq rows. Rows past S_max are
    aimed at position S_max - 1 with the value it ends up holding, so every write there agrees."""
    rows, positions, kept, last_source, last_written = plan
    new = new.to(cache.dtype)
    last = torch.where(last_written[:, None, None], new[rows[:, 0], last_source], cache[:, -1])
    cache.index_put_((rows, positions), torch.where(kept[:, :, None, None], new, last[:, None]))


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale: float, causal: bool):
    """-> out [B, Sq, Hq, d] in q's dtype; writes k, v into the caches first when given."""
    if k is not None and q.shape[1] > 0 and k_cache.shape[1] > 0:
        plan = _write_plan(cache_seqlens, q.shape[1], k_cache.shape[1])
        _write(k_cache, k, plan)
        _write(v_cache, v, plan)
    ends = visible_ends(cache_seqlens, q.shape[1], k_cache.shape[1], k is not None, causal)  # [B, Sq]
    allowed = torch.arange(k_cache.shape[1], device=q.device)[None, None, :] < ends[:, :, None]  # [B, Sq, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=allowed[:, None], scale=softmax_scale,
                                         enable_gqa=q.shape[2] != k_cache.shape[2])
    return torch.where((ends > 0)[:, None, :, None], out, 0).transpose(1, 2)  # a query without keys outputs 0
