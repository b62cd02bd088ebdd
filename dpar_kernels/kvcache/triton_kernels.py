"""Triton KV-cache attention (flash-decoding): one launch that writes the new keys and attends over KV splits, then
a merge of the splits' softmax states when there is more than one split.

Layouts and semantics as in naive.py: q [B, Sq, Hq, d], caches [B, S_max, Hk, d] (contiguous last dim, other
strides free), new keys k/v [B, Sq, Hk, d], cache_seqlens int32 [B] read on the device only. Program (split,
b * Hk + kv head, row block) of the attend kernel owns BLOCK_M rows r = g * Sq + i (query i of query head
kv_head * group + g): the keys of one kv head are loaded once for all its query heads. Each split covers SPLIT keys.

The write is fused: positions [cached, cached + Sq) are read from k/v themselves (never from the cache), so the
programs of split 0, row block 0 can store them into the cache in the same launch with no ordering between
programs. The split count comes from the work (B x Hk x row blocks) against the GPU's SM count, FlashAttention-2's
wave-efficiency rule; with one split the attend kernel writes the output itself and no merge runs.
fp32 statistics, base-2 exponentials; fp32 inputs use IEEE dots (no TF32). Offsets that scale with the batch
index are int64.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .._dispatch import device_guard, triton_interpreter
from ..attention.triton_kernels import online_softmax_step

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_TILE = 16  # tl.dot needs every block dim >= 16
_MAX_SPLITS = 32
_INTERPRETER_SMS = 8  # the interpreter has no SMs: a small machine, so that tests reach several splits


@triton.jit
def _visible_end(cached, i, max_keys, seqlen_q, APPENDED: tl.constexpr, CAUSAL: tl.constexpr):
    """Number of leading cache keys query i sees (clamped to [0, max_keys]); cached is already clamped."""
    total = cached + 0 * i
    if APPENDED:
        total += seqlen_q
    if CAUSAL:
        total += 1 + i - seqlen_q
    return tl.minimum(tl.maximum(total, 0), max_keys)


@triton.jit
def _load_keys(cache_base, new_base, s_cache, s_new, cols, cached, hi, offs_d, d_ok,
               APPENDED: tl.constexpr):
    """Key (or value) rows cols [BLOCK_N, BLOCK_D]: from the cache below ``cached``, from the new rows above it
    (APPENDED), zero at cols >= hi."""
    col_ok = cols < hi
    in_cache = col_ok & (cols < cached)
    rows = tl.load(cache_base + cols[:, None] * s_cache + offs_d[None, :], mask=in_cache[:, None] & d_ok[None, :],
                   other=0.0)
    if APPENDED:
        is_new = col_ok & (cols >= cached)
        new_rows = tl.load(new_base + (cols - cached)[:, None] * s_new + offs_d[None, :],
                           mask=is_new[:, None] & d_ok[None, :], other=0.0)
        rows = tl.where(is_new[:, None], new_rows, rows)
    return rows


@triton.jit
def _attend_kernel(Q, K, V, K_new, V_new, Out, O_part, Lse_part, cache_seqlens, qk_scale_log2, seqlen_q, max_keys,
                   heads_kv, group,
                   s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_nb, s_ns, s_nh, s_wb, s_ws, s_wh,
                   s_ob, s_os, s_oh, s_op, s_or, s_lp,
                   SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, APPENDED: tl.constexpr, CAUSAL: tl.constexpr, ONE_SPLIT: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Attention of BLOCK_M rows over the keys [split * SPLIT, +SPLIT): the output itself (ONE_SPLIT) or the
    normalised partial output and its lse (log2) for the merge. Split 0, row block 0 also stores the new keys."""
    split, unit, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, kv_head = (unit // heads_kv).to(tl.int64), unit % heads_kv
    cached = tl.minimum(tl.maximum(tl.load(cache_seqlens + b), 0), max_keys)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    k_base = K + b * s_kb + kv_head * s_kh
    v_base = V + b * s_vb + kv_head * s_vh
    kn_base = K_new + b * s_nb + kv_head * s_nh
    vn_base = V_new + b * s_wb + kv_head * s_wh
    if APPENDED:
        if (split == 0) & (block == 0):
            for j0 in range(0, seqlen_q, BLOCK_N):
                j = j0 + offs_n
                fits = (j < seqlen_q) & (cached + j < max_keys)
                mask = fits[:, None] & d_ok[None, :]
                k_new = tl.load(kn_base + j[:, None] * s_ns + offs_d[None, :], mask=mask)
                v_new = tl.load(vn_base + j[:, None] * s_ws + offs_d[None, :], mask=mask)
                tl.store(k_base + (cached + j)[:, None] * s_ks + offs_d[None, :], k_new, mask=mask)
                tl.store(v_base + (cached + j)[:, None] * s_vs + offs_d[None, :], v_new, mask=mask)

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * seqlen_q
    i = rows % seqlen_q
    head = kv_head * group + rows // seqlen_q
    q = tl.load(Q + b * s_qb + i[:, None] * s_qs + head[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    ends = tl.where(row_ok, _visible_end(cached, i, max_keys, seqlen_q, APPENDED, CAUSAL), 0)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, tl.max(ends, 0))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = _load_keys(k_base, kn_base, s_ks, s_ns, cols, cached, hi, offs_d, d_ok, APPENDED)
        v = _load_keys(v_base, vn_base, s_vs, s_ws, cols, cached, hi, offs_d, d_ok, APPENDED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        s = tl.where(cols[None, :] < ends[:, None], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PRECISION)
    sees = l_i > 0
    out = acc / tl.where(sees, l_i, 1.0)[:, None]
    store_ok = row_ok[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        tl.store(Out + b * s_ob + i[:, None] * s_os + head[:, None] * s_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=store_ok)
    else:
        lse = tl.where(sees, m_i + tl.math.log2(tl.where(sees, l_i, 1.0)), float("-inf"))
        # partial rows are indexed (b, i, head) like q, flattened: ((b * Sq + i) * Hq + head)
        flat = (b * seqlen_q + i) * (heads_kv * group) + head
        tl.store(O_part + split * s_op + flat[:, None] * s_or + offs_d[None, :], out, mask=store_ok)
        tl.store(Lse_part + split * s_lp + flat, lse, mask=row_ok)


@triton.jit
def _merge_kernel(O_part, Lse_part, Out, splits, s_op, s_or, s_lp, s_ob, s_os, s_oh, seqlen_q, heads_q,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program flat (b, i, head): out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); 0 without keys."""
    flat = tl.program_id(0).to(tl.int64)
    b, i, head = flat // (seqlen_q * heads_q), (flat // heads_q) % seqlen_q, flat % heads_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(Lse_part + offs_s * s_lp + flat, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weights = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top)))
    parts = tl.load(O_part + offs_s[:, None] * s_op + flat * s_or + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * s_ob + i * s_os + head * s_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (_INTERPRETER_SMS for the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(units: int, key_tiles: int, sms: int, max_splits: int = _MAX_SPLITS) -> int:
    """KV splits for ``units`` programs per split (B x Hk x row blocks) over ``key_tiles`` tiles of keys.

    FlashAttention-2's rule (num_splits_heuristic): no split when the units already fill 80% of the SMs; else the
    fewest splits whose wave efficiency (work / whole waves of SMs) is within 85% of the best, counting only split
    counts that change the tiles per split."""
    if units >= 0.8 * sms or key_tiles <= 1:
        return 1
    max_splits = min(max_splits, sms, key_tiles)
    eligible = [s for s in range(1, max_splits + 1)
                if s == 1 or math.ceil(key_tiles / s) != math.ceil(key_tiles / (s - 1))]
    efficiency = {s: (units * s / sms) / math.ceil(units * s / sms) for s in eligible}
    best = max(efficiency.values())
    return next(s for s in eligible if efficiency[s] >= 0.85 * best)


def _tiles(q: torch.Tensor, rows: int) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_N keys): rows sized to the group's queries, small key tiles on the interpreter."""
    block_m = max(_MIN_TILE, min(64, triton.next_power_of_2(max(rows, 1))))
    block_n = _MIN_TILE if triton_interpreter() and q.device.type == "cpu" else (64 if q.shape[3] <= 64 else 32)
    return block_m, block_n


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale: float, causal: bool):
    """-> out [B, Sq, Hq, d] in q's dtype; semantics of naive.kvcache_attention."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend 'triton' takes float32/float16/bfloat16 tensors, got {q.dtype}")
    batch, seqlen_q, heads_q, head_dim = q.shape
    max_keys, heads_kv = k_cache.shape[1], k_cache.shape[2]
    if q.numel() == 0 or max_keys == 0:  # nothing to attend to and no position to write
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    group = heads_q // heads_kv
    block_d = max(_MIN_TILE, triton.next_power_of_2(head_dim))
    block_m, block_n = _tiles(q, group * seqlen_q)
    row_blocks = triton.cdiv(group * seqlen_q, block_m)
    key_tiles = triton.cdiv(max_keys, block_n)
    splits = num_splits(batch * heads_kv * row_blocks, key_tiles, sm_count(q.device))
    split = triton.cdiv(key_tiles, splits) * block_n
    splits = triton.cdiv(max_keys, split)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if splits == 1:
        partial = lse = out  # unused by the kernel
    else:
        partial = torch.empty((splits, batch * seqlen_q * heads_q, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((splits, batch * seqlen_q * heads_q), dtype=torch.float32, device=q.device)
    k_new, v_new = (k, v) if k is not None else (k_cache, v_cache)  # unread without APPENDED
    with device_guard(q):
        _attend_kernel[(splits, batch * heads_kv, row_blocks)](
            q, k_cache, v_cache, k_new, v_new, out, partial, lse, cache_seqlens, softmax_scale * _LOG2E, seqlen_q,
            max_keys, heads_kv, group, *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
            *k_new.stride()[:3], *v_new.stride()[:3], *out.stride()[:3], partial.stride(0), partial.stride(1),
            lse.stride(0), SPLIT=split, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            APPENDED=k is not None, CAUSAL=causal, ONE_SPLIT=splits == 1,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        if splits > 1:
            _merge_kernel[(batch * seqlen_q * heads_q,)](
                partial, lse, out, splits, partial.stride(0), partial.stride(1), lse.stride(0), *out.stride()[:3],
                seqlen_q, heads_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out
