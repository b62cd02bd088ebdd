"""The "torch" backend of kvcache_attention: the new keys scattered into the caches (B x Sq rows, not a rewrite of the
whole cache) and torch's scaled_dot_product_attention over the cache with a per-row length mask (GQA by
enable_gqa). naive.py is the reference; both share its semantics (visible_ends) and never read cache_seqlens on the
host. Shapes: q [B, Sq, Hq, d]; caches [B, S_max, Hk, d]; cache_seqlens int32 [B]; k, v [B, Sq, Hk, d] or None.
"""
import torch
import torch.nn.functional as F

from .naive import visible_ends


def write_new(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """cache[b, cached_b + i] = new[b, i] for positions below S_max, in place: one index_put of B x Sq rows. Rows past
    S_max are aimed at the last position with the value it ends up holding, so every write there agrees."""
    batch, seqlen_q = new.shape[:2]
    max_keys = cache.shape[1]
    if seqlen_q == 0 or max_keys == 0:
        return
    new = new.to(cache.dtype)
    position = cache_seqlens.long().clamp(0, max_keys)[:, None] + torch.arange(seqlen_q, device=cache.device)
    kept = position < max_keys  # [B, Sq]
    lands_last = position == max_keys - 1
    last = torch.where(lands_last.any(1)[:, None, None], (new * lands_last[:, :, None, None]).sum(1), cache[:, -1])
    rows = torch.arange(batch, device=cache.device)[:, None].expand(-1, seqlen_q)
    values = torch.where(kept[:, :, None, None], new, last[:, None])
    cache.index_put_((rows, position.clamp(max=max_keys - 1)), values)


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale: float, causal: bool):
    """-> out [B, Sq, Hq, d] in q's dtype; writes k, v into the caches first when given."""
    if k is not None:
        write_new(k_cache, k, cache_seqlens)
        write_new(v_cache, v, cache_seqlens)
    ends = visible_ends(cache_seqlens, q.shape[1], k_cache.shape[1], k is not None, causal)  # [B, Sq]
    allowed = torch.arange(k_cache.shape[1], device=q.device)[None, None, :] < ends[:, :, None]  # [B, Sq, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=allowed[:, None], scale=softmax_scale,
                                         enable_gqa=q.shape[2] != k_cache.shape[2])
    return torch.where((ends > 0)[:, None, :, None], out, 0).transpose(1, 2)  # a query without keys outputs 0
