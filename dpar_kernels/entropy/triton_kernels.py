"""Triton entropy kernels (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1). All arithmetic in fp32.

Both kernels keep the online state of a row: m = max raw logit, s = sum exp(t), w = sum t exp(t) with
t = (z - m) / temperature; entropy = log s - w / s. A -inf logit contributes nothing; an all -inf row gives NaN.
"""
import torch
import triton
import triton.language as tl

from .._dispatch import device_guard

TOKEN_BLOCK_V = 4096          # vocabulary values per loop step of token_entropy (per program)
LINEAR_BLOCK_N = 64           # rows per linear_entropy program
LINEAR_BLOCK_V = 64           # vocabulary columns per matmul tile
LINEAR_BLOCK_D = 32           # reduction depth per tl.dot


@triton.jit
def _shifted_state(m, s, w, pivot, inv_t):
    """Re-expresses (s, w) accumulated around max m around pivot >= m (both raw logits); m = -inf gives zeros."""
    d = (m - pivot) * inv_t
    scale = tl.exp(d)
    w = scale * (w + tl.where(s > 0, d * s, 0.0))
    return scale * s, w


@triton.jit
def _token_entropy_kernel(x_ptr, out_ptr, V, row_stride, inv_t, BLOCK_V: tl.constexpr):
    """One program per row of x [N, V] (unit column stride) -> out [N] float32."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * row_stride
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    w = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        s, w = _shifted_state(m, s, w, pivot, inv_t)
        t = (x - pivot) * inv_t
        e = tl.exp(t)
        s += tl.sum(e, axis=0)
        w += tl.sum(tl.where(e > 0, t * e, 0.0), axis=0)
        m = m_new
    tl.store(out_ptr + row, tl.log(s) - w / s)


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [N, V] fp32/fp16/bf16 with stride(1) == 1 -> entropy float32 [N]."""
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    block_v = min(TOKEN_BLOCK_V, max(16, triton.next_power_of_2(v)))
    num_warps = 8 if block_v >= 2048 else 4
    with device_guard(logits):
        _token_entropy_kernel[(n,)](logits, out, v, logits.stride(0), 1.0 / temperature, BLOCK_V=block_v,
                                    num_warps=num_warps)
    return out


@triton.jit
def _linear_entropy_kernel(h_ptr, w_ptr, b_ptr, m_ptr, s_ptr, w_out_ptr, N, V, D, stride_hn, stride_wv,
                           vocab_per_split, inv_t, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, j): rows [i BLOCK_N, (i+1) BLOCK_N) over the vocabulary slice j of vocab_per_split columns.

    Each [BLOCK_N, BLOCK_V] logits tile is a sum of tl.dot over D, consumed by the online update in registers.
    Writes the partial state (m, s, w) of the slice to [splits, N] buffers.
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    w = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ks = d0 + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            h = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            wt = tl.load(w_ptr + cols64[None, :] * stride_wv + ks[:, None], mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)
            acc = tl.dot(h, wt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        s, w = _shifted_state(m, s, w, pivot, inv_t)
        t = (z - pivot[:, None]) * inv_t
        e = tl.exp(t)
        s += tl.sum(e, axis=1)
        w += tl.sum(tl.where(e > 0, t * e, 0.0), axis=1)
        m = m_new
    offs = split * N + rows
    tl.store(m_ptr + offs, m, mask=row_ok)
    tl.store(s_ptr + offs, s, mask=row_ok)
    tl.store(w_out_ptr + offs, w, mask=row_ok)


def _merge_splits(m, s, w, inv_t: float) -> torch.Tensor:
    """Partial states [splits, N] -> entropy [N]; slices with s = 0 (all -inf) contribute nothing."""
    top = m.amax(dim=0)
    pivot = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    d = torch.where(s > 0, (m - pivot) * inv_t, torch.zeros_like(m))
    scale = torch.where(s > 0, d.exp(), torch.zeros_like(m))
    total_s = (scale * s).sum(0)
    total_w = (scale * (w + d * s)).sum(0)
    return total_s.log() - total_w / total_s


def _default_splits(row_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """Enough vocabulary slices to give ~2 programs per SM when there are few row blocks (e.g. sampling)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_blocks, triton.cdiv(2 * sms, row_blocks)))


def linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                   vocab_splits: int | None = None) -> torch.Tensor:
    """hidden [N, D], weight [V, D] (unit column stride), bias [V] or None -> entropy float32 [N].

    fp32 inputs multiply in full fp32 precision (no TF32); fp16/bf16 inputs use tensor cores with fp32
    accumulation. vocab_splits (tests) overrides the number of vocabulary slices per row block.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=hidden.device)
    row_blocks = triton.cdiv(n, LINEAR_BLOCK_N)
    vocab_blocks = triton.cdiv(v, LINEAR_BLOCK_V)
    splits = vocab_splits or _default_splits(row_blocks, vocab_blocks, hidden.device)
    vocab_per_split = triton.cdiv(vocab_blocks, splits) * LINEAR_BLOCK_V
    splits = triton.cdiv(v, vocab_per_split)
    state = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    bias_arg = bias if bias is not None else hidden  # never read when HAS_BIAS is False
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    with device_guard(hidden):
        _linear_entropy_kernel[(row_blocks, splits)](
            hidden, weight, bias_arg, state[0], state[1], state[2], n, v, d, hidden.stride(0), weight.stride(0),
            vocab_per_split, 1.0 / temperature, HAS_BIAS=bias is not None, PRECISION=precision,
            BLOCK_N=LINEAR_BLOCK_N, BLOCK_V=LINEAR_BLOCK_V, BLOCK_D=LINEAR_BLOCK_D, num_warps=4, num_stages=3)
    if splits == 1:
        _, s, w = state[:, 0]
        return s.log() - w / s
    return _merge_splits(state[0], state[1], state[2], 1.0 / temperature)
