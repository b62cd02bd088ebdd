"""Pure-PyTorch KV-cache attention: the reference for tests (dense, no host reads); the "torch" backend is
torch_backend.py.

q [B, Sq, Hq, d]; k_cache, v_cache [B, S_max, Hk, d]; cache_seqlens int32 [B]; optional k, v [B, Sq, Hk, d].
Semantics shared by every backend (see kvcache/ops.py): the cached length is clamped to [0, S_max]; new keys go to
positions cached + i (dropped at and past S_max); query i sees keys [0, end_i) with end_i = min(S_max, cached +
new - Sq + i + 1) when causal, min(S_max, cached + new) otherwise (new = Sq with k/v, else 0). A query that sees
no key outputs 0. Computes in float64 for float64 inputs, else float32.
"""
import torch


def visible_ends(cache_seqlens: torch.Tensor, seqlen_q: int, max_keys: int, appended: bool, causal: bool):
    """-> int64 [B, Sq]: number of leading cache keys each query sees."""
    cached = cache_seqlens.long().clamp(0, max_keys)
    total = cached + (seqlen_q if appended else 0)
    if causal:
        total = total[:, None] - seqlen_q + 1 + torch.arange(seqlen_q, device=cache_seqlens.device)
    else:
        total = total[:, None].expand(-1, seqlen_q)
    return total.clamp(0, max_keys)


def write_new(cache: torch.Tensor, new: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """cache[b, cached_b + i] = new[b, i] for positions below S_max, in place (no host read)."""
    max_keys, seqlen_q = cache.shape[1], new.shape[1]
    cached = cache_seqlens.long().clamp(0, max_keys)
    source = torch.arange(max_keys, device=cache.device)[None, :] - cached[:, None]  # [B, S_max]
    written = (source >= 0) & (source < seqlen_q)
    index = source.clamp(0, max(seqlen_q - 1, 0))[:, :, None, None].expand(-1, -1, *new.shape[2:])
    if seqlen_q == 0:
        return
    gathered = torch.gather(new.to(cache.dtype), 1, index)
    cache.copy_(torch.where(written[:, :, None, None], gathered, cache))


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale: float, causal: bool):
    """-> out [B, Sq, Hq, d] in q's dtype; writes k, v into the caches first when given."""
    if k is not None:
        write_new(k_cache, k, cache_seqlens)
        write_new(v_cache, v, cache_seqlens)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[2] // k_cache.shape[2]
    keys = k_cache.to(compute).repeat_interleave(group, dim=2)
    values = v_cache.to(compute).repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), keys) * softmax_scale
    ends = visible_ends(cache_seqlens, q.shape[1], k_cache.shape[1], k is not None, causal)  # [B, Sq]
    allowed = torch.arange(k_cache.shape[1], device=q.device)[None, None, :] < ends[:, :, None]  # [B, Sq, S]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    sees_keys = allowed.any(-1)[:, None, :, None]  # [B, 1, Sq, 1]
    probs = torch.where(sees_keys, torch.softmax(scores, dim=-1), 0.0)  # a row without keys outputs 0
    return torch.einsum("bhqk,bkhd->bqhd", probs, values).to(q.dtype)
