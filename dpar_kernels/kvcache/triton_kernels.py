"""Triton KV-cache attention: write the new keys, split-KV partial attention, merge of the partial softmax states.

Layouts and semantics as in naive.py: q [B, Sq, Hq, d], caches [B, S_max, Hk, d] (contiguous last dim, other
strides free), cache_seqlens int32 [B] read on the device only. Program (split, b * Hk + kv head, row block) of the
partial kernel owns BLOCK_M rows r = g * Sq + i (query i of query head kv_head * group + g): the keys of one kv
head are loaded once for all its query heads. Each split covers SPLIT keys; the merge weights the splits by their
log-sum-exp. fp32 statistics, base-2 exponentials; fp32 inputs use IEEE dots (no TF32).
"""
import contextlib

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreter
from ..attention.triton_kernels import online_softmax_step

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_TILE = 16  # tl.dot needs every block dim >= 16
_MAX_SPLITS = 16


@triton.jit
def _visible_end(cache_seqlens, b, i, max_keys, seqlen_q, APPENDED: tl.constexpr, CAUSAL: tl.constexpr):
    """Number of leading cache keys query i of row b sees (clamped to [0, max_keys])."""
    total = tl.minimum(tl.maximum(tl.load(cache_seqlens + b), 0), max_keys) + 0 * i
    if APPENDED:
        total += seqlen_q
    if CAUSAL:
        total += 1 + i - seqlen_q
    return tl.minimum(tl.maximum(total, 0), max_keys)


@triton.jit
def _write_kernel(K_new, V_new, K_cache, V_cache, cache_seqlens, seqlen_q, max_keys,
                  s_nb, s_ns, s_nh, s_vb, s_vs, s_vh, s_cb, s_cs, s_ch, s_db, s_ds, s_dh,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b * Sq + i, kv head): k_cache[b, cached + i] = k[b, i] when that position is below S_max."""
    row, h = tl.program_id(0), tl.program_id(1)
    b, i = row // seqlen_q, row % seqlen_q
    position = tl.minimum(tl.maximum(tl.load(cache_seqlens + b), 0), max_keys) + i
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_d < HEAD_DIM) & (position < max_keys)
    k = tl.load(K_new + b * s_nb + i * s_ns + h * s_nh + offs_d, mask=mask)
    v = tl.load(V_new + b * s_vb + i * s_vs + h * s_vh + offs_d, mask=mask)
    tl.store(K_cache + b * s_cb + position * s_cs + h * s_ch + offs_d, k, mask=mask)
    tl.store(V_cache + b * s_db + position * s_ds + h * s_dh + offs_d, v, mask=mask)


@triton.jit
def _partial_kernel(Q, K, V, O_part, Lse_part, cache_seqlens, qk_scale_log2, seqlen_q, max_keys, heads_kv, group,
                    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_op, s_or, s_lp,
                    SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, APPENDED: tl.constexpr, CAUSAL: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Partial attention of the keys [split * SPLIT, +SPLIT) -> normalised partial out and its lse (log2)."""
    split, unit, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, kv_head = unit // heads_kv, unit % heads_kv
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * seqlen_q
    i = rows % seqlen_q
    head = kv_head * group + rows // seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + i[:, None] * s_qs + head[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    ends = tl.where(row_ok, _visible_end(cache_seqlens, b, i, max_keys, seqlen_q, APPENDED, CAUSAL), 0)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, tl.max(ends, 0))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * s_kb + kv_head * s_kh
    v_base = V + b * s_vb + kv_head * s_vh
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < hi
        k = tl.load(k_base + cols[:, None] * s_ks + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vs + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        s = tl.where(cols[None, :] < ends[:, None], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PRECISION)
    sees = l_i > 0
    out = acc / tl.where(sees, l_i, 1.0)[:, None]
    lse = tl.where(sees, m_i + tl.math.log2(tl.where(sees, l_i, 1.0)), float("-inf"))
    # partial rows are indexed (b, i, head) like q, flattened: ((b * Sq + i) * Hq + head)
    flat = (b * seqlen_q + i) * (heads_kv * group) + head
    tl.store(O_part + split * s_op + flat[:, None] * s_or + offs_d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse_part + split * s_lp + flat, lse, mask=row_ok)


@triton.jit
def _merge_kernel(O_part, Lse_part, Out, splits, s_op, s_or, s_lp, s_ob, s_os, s_oh, seqlen_q, heads_q,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program flat (b, i, head): out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); 0 without keys."""
    flat = tl.program_id(0)
    b, i, head = flat // (seqlen_q * heads_q), (flat // heads_q) % seqlen_q, flat % heads_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    lse = tl.load(Lse_part + offs_s * s_lp + flat, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top)))
    parts = tl.load(O_part + offs_s[:, None] * s_op + flat * s_or + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * s_ob + i * s_os + head * s_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _on_device_of(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tiles(q: torch.Tensor, rows: int, max_keys: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, SPLIT keys per split): rows sized to the group's queries, splits to the cache."""
    block_m = max(_MIN_TILE, min(64, triton.next_power_of_2(max(rows, 1))))
    block_n = _MIN_TILE if triton_interpreter() and q.device.type == "cpu" else (64 if q.shape[3] <= 64 else 32)
    split = max(4 * block_n, triton.cdiv(triton.cdiv(max_keys, _MAX_SPLITS), block_n) * block_n)
    return block_m, block_n, split


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale: float, causal: bool):
    """-> out [B, Sq, Hq, d] in q's dtype; semantics of naive.kvcache_attention."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend 'triton' takes float32/float16/bfloat16 tensors, got {q.dtype}")
    batch, seqlen_q, heads_q, head_dim = q.shape
    max_keys, heads_kv = k_cache.shape[1], k_cache.shape[2]
    group = heads_q // heads_kv
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    block_d = max(_MIN_TILE, triton.next_power_of_2(head_dim))
    with _on_device_of(q):
        if k is not None and batch * seqlen_q * heads_kv > 0:
            _write_kernel[(batch * seqlen_q, heads_kv)](
                k, v, k_cache, v_cache, cache_seqlens, seqlen_q, max_keys, *k.stride()[:3], *v.stride()[:3],
                *k_cache.stride()[:3], *v_cache.stride()[:3], HEAD_DIM=head_dim, BLOCK_D=block_d)
        if out.numel() == 0 or max_keys == 0:
            return out
        block_m, block_n, split = _tiles(q, group * seqlen_q, max_keys)
        splits = triton.cdiv(max_keys, split)
        partial = torch.empty((splits, batch * seqlen_q * heads_q, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, batch * seqlen_q * heads_q), dtype=torch.float32, device=q.device)
        _partial_kernel[(splits, batch * heads_kv, triton.cdiv(group * seqlen_q, block_m))](
            q, k_cache, v_cache, partial, lse, cache_seqlens, softmax_scale * _LOG2E, seqlen_q, max_keys, heads_kv,
            group, *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], partial.stride(0),
            partial.stride(1), lse.stride(0), SPLIT=split, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m,
            BLOCK_N=block_n, APPENDED=k is not None, CAUSAL=causal,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        _merge_kernel[(batch * seqlen_q * heads_q,)](
            partial, lse, out, splits, partial.stride(0), partial.stride(1), lse.stride(0), *out.stride()[:3],
            seqlen_q, heads_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out
