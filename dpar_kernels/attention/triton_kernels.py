"""Triton varlen attention, FlashAttention-2 style: forward, and a deterministic backward without atomics.

Layouts as in naive.py: q [total_q, Hq, d], k/v [total_k, Hk, d] (stride(-1) == 1, token and head strides free),
cu_seqlens int32 [B+1], lse float32 [Hq, total_q]. causal masks bottom-right aligned: query j of a sequence with
Lq queries and Lk keys sees keys n <= j + (Lk - Lq). A query that sees no key gets out 0 and lse -inf.

Matmuls run in the input dtype with fp32 accumulation (fp32 inputs: IEEE precision, no TF32); the softmax keeps
fp32 statistics in the base-2 domain (exp2). Each program owns one (block, head, sequence); the block and sequence
indices share grid axis 0 because axes 1 and 2 are limited to 65535 and a batch of patches (cross-attention, one
query per segment) can hold more sequences than that.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._dispatch import device_guard, triton_interpreter
from ..constants import ATTENTION_HEAD_DIMS

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------- helpers


@triton.jit
def _load(ptrs, row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Loads a [rows, BLOCK_D] tile; zero where a row is out of range (CHECK_ROWS) or a column >= HEAD_DIM."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _store(ptrs, value, row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores a [rows, BLOCK_D] fp32 tile in the pointer's dtype, rows where row_ok, columns < HEAD_DIM."""
    value = value.to(ptrs.dtype.element_ty)
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, value, mask=row_ok[:, None])
    else:
        tl.store(ptrs, value, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_range(m0, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys that queries [m0, m0 + BLOCK_M) attend to: [0, full_end) seen by every query of the block (no mask),
    [full_end, end) need the key-length / causal mask. full_end is a multiple of BLOCK_N."""
    if CAUSAL:
        shift = len_k - len_q
        end = tl.minimum(len_k, tl.maximum(m0 + BLOCK_M + shift, 0))
        full_end = tl.minimum(end, tl.maximum(m0 + 1 + shift, 0))
    else:
        end = len_k
        full_end = len_k
    return (full_end // BLOCK_N) * BLOCK_N, end


@triton.jit
def _load_lse(lse_ptrs, row_ok):
    """log2-domain lse of query rows; +inf for out-of-range rows, so that their p = 0.

    A query that sees no key (lse -inf) only meets key tiles that are masked for it, where p is set to 0."""
    return tl.load(lse_ptrs, mask=row_ok, other=float("inf")) * 1.4426950408889634  # log2(e)


# ---------------------------------------------------------------------------------------------------- forward


@triton.jit
def _forward_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, lo, hi,
                   len_q, len_k, qk_scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update over key tiles [lo, hi): m_i (row max, log2 domain), l_i (row sum), acc (P @ V)."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        k = _load(k_base + cols[:, None] * stride_kt + offs_d[None, :], col_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + (len_k - len_q))
            s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """One key tile of the online softmax: log2-scaled masked scores s [M, N] and values v [N, D] folded into the
    running (acc [M, D], row max m_i [M], row sum l_i [M]); shared with the KV-cache decode kernel."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: avoid inf - inf
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _sequence_block(cu_blocked, cu_other, n_blocks, total_blocked, total_other, BLOCK: tl.constexpr):
    """Program axis 0 = block + n_blocks * sequence -> (first row of the block, start and length of the blocked
    side's sequence, start and length of the other side's). Starts and ends are clamped to [0, total], so
    offsets that lie (validation skipped) never index out of bounds."""
    pid = tl.program_id(0)
    seq = pid // n_blocks
    first = (pid % n_blocks) * BLOCK
    start, length = _clamped_segment(cu_blocked, seq, total_blocked)
    other_start, other_length = _clamped_segment(cu_other, seq, total_other)
    return first, start, length, other_start, other_length


@triton.jit
def _clamped_segment(cu, seq, total):
    start = tl.minimum(tl.maximum(tl.load(cu + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu + seq + 1), start), total)
    return start, end - start


@triton.jit
def _forward_kernel(Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, total_q, total_k, qk_scale_log2,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    stride_lse_h, n_blocks, group,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block + n_blocks * sequence, q head): out rows and lse of BLOCK_M queries."""
    m0, q_start, len_q, k_start, len_k = _sequence_block(cu_seqlens_q, cu_seqlens_k, n_blocks, total_q, total_k,
                                                         BLOCK_M)
    if m0 >= len_q:
        return
    head = tl.program_id(1)
    kv_head = head // group

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
    q = _load(q_base + rows[:, None] * stride_qt + offs_d[None, :], row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, end = _key_range(m0, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                   0, full_end, len_q, len_k, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                   False, PRECISION)
    acc, m_i, l_i = _forward_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                                   full_end, end, len_q, len_k, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                   True, PRECISION)

    seen = l_i > 0.0  # false for a query that sees no key: out 0 (acc is 0), lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> ln
    o_base = Out + q_start.to(tl.int64) * stride_ot + head * stride_oh
    _store(o_base + rows[:, None] * stride_ot + offs_d[None, :], out, row_ok, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(Lse + head.to(tl.int64) * stride_lse_h + q_start + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------- backward


@triton.jit
def _delta_kernel(Out, dOut, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32. Program (token block, q head)."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < total_q
    offs_d = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    o = _load(Out + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], row_ok, offs_d, HEAD_DIM,
              BLOCK_D, True)
    do = _load(dOut + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], row_ok, offs_d,
               HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * stride_delta_h + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols, offs_m,
                offs_d, lo, hi, len_q, len_k, qk_scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Adds the query tiles [lo, hi) of one q head to dk, dv [BLOCK_N, BLOCK_D] (transposed scores, P^T).

    Query rows past len_q get p = 0 through their lse (+inf); key rows past len_k are zero and never stored, so
    their columns need no mask."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < len_q
        q = _load(q_base + rows[:, None] * stride_qt + offs_d[None, :], row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        do = _load(do_base + rows[:, None] * stride_dot + offs_d[None, :], row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        lse = _load_lse(lse_base + rows, row_ok)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale_log2 - lse[None, :])
        if CAUSAL:
            p_t = tl.where(cols[:, None] <= rows[None, :] + (len_k - len_q), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, cu_seqlens_q, cu_seqlens_k, total_q, total_k, softmax_scale,
                 qk_scale_log2,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h, n_blocks, group,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Program (key block + n_blocks * sequence, kv head): dk, dv of BLOCK_N keys, summed over the q heads of
    the group and all query tiles that see them (no atomics, deterministic)."""
    n0, k_start, len_k, q_start, len_q = _sequence_block(cu_seqlens_k, cu_seqlens_q, n_blocks, total_k, total_q,
                                                         BLOCK_N)
    if n0 >= len_k:
        return
    kv_head = tl.program_id(1)

    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < len_k
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_start64 = k_start.to(tl.int64)
    k = _load(K + k_start64 * stride_kt + kv_head * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
              col_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load(V + k_start64 * stride_vt + kv_head * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
              col_ok, offs_d, HEAD_DIM, BLOCK_D, True)

    # Query tiles from the first that sees a key of the block (causal: query j sees key n iff
    # j >= n - (len_k - len_q)) to the end. One loop that masks every tile: splitting off the tiles below the
    # diagonal into an unmasked loop made ptxas spill registers at d = 128 and saves only a select per element.
    q_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(n0 - (len_k - len_q), 0) // BLOCK_M) * BLOCK_M
    else:
        lo = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_start64 = q_start.to(tl.int64)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = Q + q_start64 * stride_qt + head * stride_qh
        do_base = dOut + q_start64 * stride_dot + head * stride_doh
        lse_base = Lse + head.to(tl.int64) * stride_lse_h + q_start
        delta_base = Delta + head.to(tl.int64) * stride_lse_h + q_start
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols,
                             offs_m, offs_d, lo, q_end, len_q, len_k, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_M,
                             CAUSAL, PRECISION)

    _store(dK + k_start64 * stride_dkt + kv_head * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
           dk * softmax_scale, col_ok, offs_d, HEAD_DIM, BLOCK_D)
    _store(dV + k_start64 * stride_dvt + kv_head * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
           dv, col_ok, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, lo, hi,
              len_q, len_k, qk_scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Adds the key tiles [lo, hi) to dq [BLOCK_M, BLOCK_D] (unscaled dS @ K)."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        k = _load(k_base + cols[:, None] * stride_kt + offs_d[None, :], col_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2 - lse[:, None])
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + (len_k - len_q))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, dOut, Lse, Delta, dQ, cu_seqlens_q, cu_seqlens_k, total_q, total_k, softmax_scale,
               qk_scale_log2,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_dqt, stride_dqh, stride_lse_h, n_blocks, group,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block + n_blocks * sequence, q head): dq of BLOCK_M queries."""
    m0, q_start, len_q, k_start, len_k = _sequence_block(cu_seqlens_q, cu_seqlens_k, n_blocks, total_q, total_k,
                                                         BLOCK_M)
    if m0 >= len_q:
        return
    head = tl.program_id(1)
    kv_head = head // group

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_start64 = q_start.to(tl.int64)
    q = _load(Q + q_start64 * stride_qt + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
              row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load(dOut + q_start64 * stride_dot + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
               row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    lse_row = head.to(tl.int64) * stride_lse_h + q_start
    lse = _load_lse(Lse + lse_row + rows, row_ok)
    delta = tl.load(Delta + lse_row + rows, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, end = _key_range(m0, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, 0, full_end,
                   len_q, len_k, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, False, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, full_end,
                   end, len_q, len_k, qk_scale_log2, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, True, PRECISION)
    _store(dQ + q_start64 * stride_dqt + head * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
           dq * softmax_scale, row_ok, offs_d, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------------- launch


@dataclass(frozen=True)
class _Tiles:
    """Tile sizes and launch parameters of one kernel: m = query rows, n = key rows per tile."""
    m: int
    n: int
    warps: int
    stages: int


# Per-kernel tiles for H100-class GPUs, keyed by (fp32 inputs, head dim > 64). Not timed on hardware: chosen so
# that ptxas (sm_90a) reports no register spills with Triton 3.6, 3.8 and 3.9 (scripts/triton_attention_ptxas.py).
# 16-bit inputs use tensor cores; fp32 inputs (IEEE dot, no tensor cores) use smaller tiles.
_GPU_TILES = {
    "forward": {(False, False): _Tiles(128, 64, 8, 3), (False, True): _Tiles(128, 32, 8, 3),
                (True, False): _Tiles(32, 32, 4, 2), (True, True): _Tiles(32, 16, 8, 2)},
    "dkdv": {(False, False): _Tiles(32, 128, 8, 3), (False, True): _Tiles(32, 64, 8, 3),
             (True, False): _Tiles(32, 32, 8, 2), (True, True): _Tiles(16, 32, 4, 1)},
    "dq": {(False, False): _Tiles(128, 32, 8, 3), (False, True): _Tiles(64, 32, 8, 3),
           (True, False): _Tiles(64, 16, 8, 2), (True, True): _Tiles(32, 16, 8, 2)},
}
# Short ragged sequences (every sequence of both sides at most SHORT_SEQLEN, as DPAR's patches and per-image
# token runs): tiles of at most 64 rows and 4 warps, so that a sequence fills whole tiles and a program's warps
# have rows to work on; 16-bit inputs only (fp32 tiles are already this size). Not timed on hardware either; the
# dK/dV tiles are the largest without spills.
SHORT_SEQLEN = 128
_SHORT_TILES = {"forward": {False: _Tiles(64, 64, 4, 2), True: _Tiles(64, 32, 4, 2)},
                "dkdv": {False: _Tiles(32, 64, 4, 2), True: _Tiles(32, 32, 4, 2)},
                "dq": {False: _Tiles(64, 64, 4, 2), True: _Tiles(64, 32, 4, 2)}}
_MIN_TILE = 16  # tl.dot needs every block dim >= 16
_DELTA_ROWS, _DELTA_WARPS = 64, 8  # tokens per program of the delta = rowsum(dO * O) kernel


def gpu_tiles(kernel: str, dtype: torch.dtype, head_dim: int, max_seqlen_q: int, max_seqlen_k: int) -> _Tiles:
    """Tile sizes of ``kernel`` on a GPU: the short-sequence tiles when both sides' sequences are at most
    SHORT_SEQLEN (16-bit inputs), else the long ones, shrunk to the longest sequences (a one-query
    cross-attention uses 16 rows)."""
    fp32, wide = dtype == torch.float32, head_dim > 64
    short = not fp32 and max(max_seqlen_q, max_seqlen_k) <= SHORT_SEQLEN
    base = _SHORT_TILES[kernel][wide] if short else _GPU_TILES[kernel][(fp32, wide)]
    fit = lambda block, length: min(block, max(_MIN_TILE, triton.next_power_of_2(length)))  # noqa: E731
    return _Tiles(fit(base.m, max_seqlen_q), fit(base.n, max_seqlen_k), base.warps, base.stages)


def _tiles(kernel: str, q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int) -> _Tiles:
    if triton_interpreter() and q.device.type == "cpu":
        return _Tiles(_MIN_TILE, _MIN_TILE, 1, 1)  # the interpreter's cost grows with the tile size
    return gpu_tiles(kernel, q.dtype, q.shape[2], max_seqlen_q, max_seqlen_k)


def _constants(q: torch.Tensor, causal: bool, tiles: _Tiles) -> dict:
    return dict(HEAD_DIM=q.shape[2], BLOCK_D=triton.next_power_of_2(q.shape[2]), BLOCK_M=tiles.m,
                BLOCK_N=tiles.n, CAUSAL=causal, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=tiles.warps, num_stages=tiles.stages)


def _check_kernel_inputs(q: torch.Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(f"backend 'triton' takes float32/float16/bfloat16 q, k, v, got {q.dtype}")
    if q.shape[2] not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"backend 'triton' supports head dims {ATTENTION_HEAD_DIMS}, got {q.shape[2]}")


def _row_major_lse(lse: torch.Tensor) -> torch.Tensor:
    """The kernels index lse/delta [Hq, total_q] with a unit token stride."""
    return lse if lse.stride(-1) == 1 else lse.contiguous()


def forward_into(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                 causal: bool, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Writes every element of out [total_q, Hq, d] (q's dtype) and lse float32 [Hq, total_q] (unit stride on
    tokens); shapes and validation as in dpar_kernels.varlen_attention."""
    _check_kernel_inputs(q)
    n_seq = cu_seqlens_q.numel() - 1
    if out.numel() == 0 or n_seq == 0:
        return
    tiles = _tiles("forward", q, max_seqlen_q, max_seqlen_k)
    n_blocks = triton.cdiv(max_seqlen_q, tiles.m)
    with device_guard(q):
        _forward_kernel[(n_blocks * n_seq, q.shape[1])](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], softmax_scale * _LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), lse.stride(0), n_blocks, q.shape[1] // k.shape[1], **_constants(q, causal, tiles))


def backward_into(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                  softmax_scale: float, causal: bool, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Writes every element of dq (like q), dk and dv (like k); stride(-1) == 1 for all of them."""
    _check_kernel_inputs(q)
    n_seq = cu_seqlens_q.numel() - 1
    if q.shape[1] == 0:  # no query heads: nothing flows back to k and v
        dk.zero_()
        dv.zero_()
    if n_seq == 0 or q.shape[1] == 0:
        return
    with device_guard(q):
        _launch_backward(dout, q, k, v, out, _row_major_lse(lse), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, softmax_scale, causal, dq, dk, dv)


def _launch_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal, dq, dk, dv) -> None:
    """delta = rowsum(dO * O), then the dK/dV and dQ kernels; arguments as in backward_into."""
    n_seq = cu_seqlens_q.numel() - 1
    group = q.shape[1] // k.shape[1]
    total_q, total_k = q.shape[0], k.shape[0]
    delta = torch.empty((q.shape[1], total_q), dtype=torch.float32, device=q.device)
    if total_q > 0:
        block_t = _MIN_TILE if triton_interpreter() and q.device.type == "cpu" else _DELTA_ROWS
        _delta_kernel[(triton.cdiv(total_q, block_t), q.shape[1])](
            out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            delta.stride(0), HEAD_DIM=q.shape[2], BLOCK_D=triton.next_power_of_2(q.shape[2]), BLOCK_T=block_t,
            num_warps=_DELTA_WARPS)
    common = (total_q, total_k, softmax_scale, softmax_scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0),
              k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1))
    if total_k > 0:
        tiles = _tiles("dkdv", q, max_seqlen_q, max_seqlen_k)
        n_blocks = triton.cdiv(max_seqlen_k, tiles.n)
        _dkdv_kernel[(n_blocks * n_seq, k.shape[1])](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, *common, dk.stride(0), dk.stride(1),
            dv.stride(0), dv.stride(1), lse.stride(0), n_blocks, group, **_constants(q, causal, tiles))
    if total_q > 0:
        tiles = _tiles("dq", q, max_seqlen_q, max_seqlen_k)
        n_blocks = triton.cdiv(max_seqlen_q, tiles.m)
        _dq_kernel[(n_blocks * n_seq, q.shape[1])](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *common, dq.stride(0), dq.stride(1),
            lse.stride(0), n_blocks, group, **_constants(q, causal, tiles))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float, causal: bool):
    """-> (out [total_q, Hq, d] in q's dtype, lse float32 [Hq, total_q]); semantics of naive.varlen_attention.

    Outputs start zeroed so rows that lying offsets (validation off) leave uncovered read 0, never stale memory."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    forward_into(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, out, lse)
    return out, lse


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, softmax_scale: float, causal: bool):
    """dout [total_q, Hq, d] -> (dq, dk, dv) in the dtypes of q, k, v; semantics of naive's backward (zeroed
    first, like the forward's output)."""
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    backward_into(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                  causal, dq, dk, dv)
    return dq, dk, dv
