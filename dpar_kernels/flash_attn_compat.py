"""Drop-in replacements for flash-attn 2.x entry points and torch's ``torch.nn.attention.varlen.varlen_attn``.

Replacing ``from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache`` with
``from dpar_kernels.flash_attn_compat import ...`` is the only change flash-attn code needs: the signatures,
argument order, defaults (``causal=False``) and return layouts are flash-attn's. Features the dpar kernels do not
have (dropout, sliding windows, softcap, ALiBi, paged KV, returning attention probabilities) raise
NotImplementedError naming the argument instead of being ignored.
"""
import operator

import torch

import dpar_kernels as dk


def _reject(**features) -> None:
    """features: argument name -> True when the caller asked for it; raises NotImplementedError for the first."""
    for name, requested in features.items():
        if requested:
            raise NotImplementedError(f"{name} is not supported by dpar_kernels (flash-attn feature); "
                                      f"leave it at its default")


def _window_is_full(window_size) -> bool:
    return tuple(window_size) == (-1, -1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func: q [total_q, Hq, d], k/v [total_k, Hk, d], cu_seqlens int32 [B+1].

    Returns out [total_q, Hq, d]. causal=True is bottom-right aligned (flash-attn >= 2.1). ``deterministic`` is
    accepted (the dpar backward kernels need no switch for it). Differentiable in q, k, v.
    """
    _reject(dropout_p=dropout_p != 0, window_size=not _window_is_full(window_size), softcap=softcap != 0,
            alibi_slopes=alibi_slopes is not None, return_attn_probs=bool(return_attn_probs),
            block_table=block_table is not None)
    return dk.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=softmax_scale, causal=bool(causal))


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn: window_size (-1, -1) full, (-1, 0) causal (bottom-right).

    query [T_q, Hq, d], key/value [T_k, Hk, d]; Hk != Hq needs enable_gqa=True. Returns out [T_q, Hq, d], and
    (out, lse [T_q, Hq] float32) when ``return_aux.lse`` is set. ``num_splits`` is a tuning hint and ignored.
    """
    _reject(window_size=tuple(window_size) not in ((-1, -1), (-1, 0)), seqused_k=seqused_k is not None,
            block_table=block_table is not None)
    if cu_seq_k is None:
        raise ValueError("cu_seq_k is None: without block_table it must give the key offsets")
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError(f"query has {query.shape[1]} heads and key/value {key.shape[1]}: set enable_gqa=True "
                         f"for grouped-query attention")
    want_lse = return_aux is not None and bool(return_aux.lse)
    result = dk.varlen_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale,
                                 causal=tuple(window_size) == (-1, 0), return_lse=want_lse)
    if want_lse:
        out, lse = result
        return out, lse.transpose(0, 1)
    return result


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first 2 * cos.shape[-1] channels of x [B, S, H, d]; cos/sin [B, S, r/2] fp32."""
    half = cos.shape[-1]
    rot, rest = x[..., :2 * half].float(), x[..., 2 * half:]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleaved:  # GPT-J: channel pairs (0, 1), (2, 3), ...
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:  # GPT-NeoX: channel i pairs with i + r/2
        x1, x2 = rot[..., :half], rot[..., half:]
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def _rotary_tables(table: torch.Tensor, cache_seqlens: torch.Tensor, seqlen: int, same_position: bool):
    """table [seqlen_ro, r/2] -> [B, seqlen, r/2] fp32 at positions cache_seqlens[b] + i (or + 0 for all i)."""
    steps = torch.zeros(seqlen, dtype=torch.long, device=table.device) if same_position else \
        torch.arange(seqlen, device=table.device)
    positions = (cache_seqlens.to(torch.long)[:, None] + steps[None, :]).clamp(0, table.shape[0] - 1)
    return table.float()[positions]


def _cache_seqlens_tensor(cache_seqlens, k_cache: torch.Tensor, k) -> torch.Tensor:
    """flash-attn's cache_seqlens (int, int32 [B] tensor, or None = the whole cache) as an int32 [B] tensor."""
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is None but k/v are given: cache_seqlens says where to append them")
        cache_seqlens = k_cache.shape[1]
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    if isinstance(cache_seqlens, bool) or not hasattr(type(cache_seqlens), "__index__"):  # int, numpy integer
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor, got {type(cache_seqlens).__name__}")
    length = operator.index(cache_seqlens)
    return torch.full((k_cache.shape[0],), length, dtype=torch.int32, device=k_cache.device)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash_attn.flash_attn_with_kvcache: q [B, Sq, Hq, d], k_cache/v_cache [B, S_max, Hk, d].

    k/v [B, Sq, Hk, d] (optional) are written into the caches in place at cache_seqlens[b] + i before attending.
    rotary_cos/rotary_sin [seqlen_ro, r/2] (with k/v) rotate k at positions cache_seqlens + i, and q there too
    when causal (else all of q at cache_seqlens), as flash-attn does. Returns out [B, Sq, Hq, d].
    ``num_splits`` is a tuning hint and ignored. No backward (as flash-attn).
    """
    _reject(cache_batch_idx=cache_batch_idx is not None, cache_leftpad=cache_leftpad is not None,
            block_table=block_table is not None, window_size=not _window_is_full(window_size),
            softcap=softcap != 0, alibi_slopes=alibi_slopes is not None,
            return_softmax_lse=bool(return_softmax_lse))
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    seqlens = _cache_seqlens_tensor(cache_seqlens, k_cache, k)
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the new k and q: they need k and v")
        if rotary_cos.shape != rotary_sin.shape or rotary_cos.dim() != 2 or 2 * rotary_cos.shape[1] > q.shape[-1]:
            raise ValueError(f"rotary_cos and rotary_sin must both be [seqlen_ro, rotary_dim / 2] with rotary_dim "
                             f"<= head dim {q.shape[-1]}, got {tuple(rotary_cos.shape)} and "
                             f"{tuple(rotary_sin.shape)}")
        k_tables = [_rotary_tables(t, seqlens, k.shape[1], False) for t in (rotary_cos, rotary_sin)]
        q_tables = [_rotary_tables(t, seqlens, q.shape[1], not causal) for t in (rotary_cos, rotary_sin)]
        k = _rotate(k, *k_tables, rotary_interleaved)
        q = _rotate(q, *q_tables, rotary_interleaved)
    return dk.kvcache_attention(q, k_cache, v_cache, seqlens, k, v, softmax_scale=softmax_scale,
                                causal=bool(causal))
