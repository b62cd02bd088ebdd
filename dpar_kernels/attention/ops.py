"""Public varlen attention: block-diagonal (optionally causal) attention over packed sequences.

Same argument order and layout as flash-attn's flash_attn_varlen_func. Differentiable in q, k, v; the backward
is a custom op on the same backend. FLOPs are registered with torch.utils.flop_counter (causal counted exactly).
"""
import math

import torch
from torch.utils.flop_counter import register_flop_formula

from .._autocast import cast_for_autocast, register_lower_precision
from .._checks import (check_cu_seqlens, check_finite, check_float, check_index, check_same_device, check_tensor,
                       launch_length)
from .._dispatch import resolve_backend, supported_for_dtype
from .._ops import direct_call_ok, extension_op, lazy
from . import naive

KERNEL_HEAD_DIMS = (32, 64, 80, 96, 128)  # head dims of the triton and cuda kernels; torch/cpu take any

_FORWARD = {
    "torch": naive.varlen_attention,
    "cpu": extension_op("varlen_attention"),
    "cuda": extension_op("varlen_attention"),
    "triton": lazy(".attention.triton_kernels", "varlen_attention"),
}
_BACKWARD = {
    "torch": naive.varlen_attention_backward,
    "cpu": extension_op("varlen_attention_backward"),
    "cuda": extension_op("varlen_attention_backward"),
    "triton": lazy(".attention.triton_kernels", "varlen_attention_backward"),
}


@torch.library.custom_op("dpar::varlen_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                  causal: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _FORWARD[backend](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 softmax_scale, causal)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[1], q.shape[0],
                                                                                   dtype=lse_dtype)


@torch.library.custom_op("dpar::varlen_attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool, backend: str
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _BACKWARD[backend](dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale, causal)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)
register_lower_precision("dpar::varlen_attention")


def attended_pairs(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, causal: bool) -> int:
    """Number of (query, key) pairs that attend, summed over sequences (one head).

    Causal (bottom-right): query j of a (Lq, Lk) sequence sees max(0, Lk - Lq + 1 + j) keys.
    """
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    if not causal:
        return int((lq * lk).sum())
    first = (lk - lq + 1).clamp(min=1)  # keys seen by the first query that sees any
    seeing = (lk - first + 1).clamp(min=0)  # queries that see at least one key
    return int(((first + lk) * seeing).sum()) // 2


@register_flop_formula(torch.ops.dpar.varlen_attention, get_raw=True)
def _forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, out_val=None, **kwargs) -> int:
    """Two matmuls (QK^T and PV) over the attended pairs, like torch's SDPA formula."""
    causal = args[3] if len(args) > 3 else kwargs["causal"]  # args: max_q, max_k, scale, causal, backend
    return 4 * q.shape[1] * q.shape[2] * attended_pairs(cu_seqlens_q, cu_seqlens_k, causal)


@register_flop_formula(torch.ops.dpar.varlen_attention_backward, get_raw=True)
def _backward_flops(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *args, out_val=None, **kwargs) -> int:
    """Five matmuls (recomputed QK^T, dP, dV, dQ, dK), like torch's SDPA backward formula."""
    causal = args[3] if len(args) > 3 else kwargs["causal"]
    return 10 * q.shape[1] * q.shape[2] * attended_pairs(cu_seqlens_q, cu_seqlens_k, causal)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     softmax_scale: float | None = None, causal: bool = True, return_lse: bool = False,
                     backend: str | None = None):
    """Attention of each packed query sequence over its own key sequence (flash_attn_varlen_func layout).

    q [total_q, Hq, d], k/v [total_k, Hk, d] with Hq % Hk == 0, same float dtype (fp32/fp16/bf16; fp64 on
    torch/cpu), last dim contiguous (other strides free, e.g. slices of a fused qkv). cu_seqlens_q/k int32 [B+1].
    max_seqlen_q/k: at least the longest sequence. causal=True masks bottom-right aligned. softmax_scale
    defaults to 1/sqrt(d). Returns out [total_q, Hq, d], and with return_lse=True also lse float32
    [Hq, total_q] (-inf for a query that sees no key; its output row is 0). max_seqlen_q/k: ints of any integer
    kind (Python, numpy, 0-d tensor). softmax_scale must be finite (ValueError for NaN/inf).

    NaN (the same on every backend): a NaN in a query's q row, or in a k or v row it sees, makes its output row NaN
    and its lse -inf; a NaN k row a query does not see leaves it untouched, a NaN v row may reach every query of its
    sequence (0 * NaN in the P @ V product). +-inf inputs have no defined result. Under torch.autocast,
    q, k, v run in the autocast dtype. The kernels' launch grids follow the longest sequence, never an oversized
    max_seqlen.
    """
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        q, k, v = cast_for_autocast(q.device, q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, ndim=3)
    check_tensor("cu_seqlens_q", cu_seqlens_q)
    check_tensor("cu_seqlens_k", cu_seqlens_k)
    device = check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("q, k, v must have a head dim >= 1, got 0")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
                         f"key/value heads ({k.shape[1]})")
    longest_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], device)
    longest_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    max_seqlen_q, max_seqlen_k = check_index("max_seqlen_q", max_seqlen_q), check_index("max_seqlen_k", max_seqlen_k)
    for name, value, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k, longest_k)):
        if longest is not None and value < longest:
            raise ValueError(f"{name}={value} is smaller than the longest sequence ({longest})")
    if q.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"backend {backend!r} takes float32/float16/bfloat16 q, k, v, got float64 "
                        f"(the torch and cpu backends take float64)")
    supported = supported_for_dtype(tuple(_FORWARD) if q.shape[2] in KERNEL_HEAD_DIMS else ("torch", "cpu"),
                                    q.dtype)
    if backend in ("triton", "cuda") and backend not in supported:
        raise ValueError(f"head dim {q.shape[2]} is not supported by backend {backend!r} "
                         f"(supported: {KERNEL_HEAD_DIMS}; the torch and cpu backends take any)")
    backend = resolve_backend("varlen_attention", backend, device, supported)
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else check_finite("softmax_scale", softmax_scale)
    q, k, v = (t if t.stride()[-1] == 1 else t.contiguous() for t in (q, k, v))
    args = (q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
            launch_length(longest_q, max_seqlen_q, q.shape[0]), launch_length(longest_k, max_seqlen_k, k.shape[0]),
            scale, bool(causal))
    if direct_call_ok(backend, q, k, v, cu_seqlens_q, cu_seqlens_k):  # no gradient: the kernel without the dispatcher
        out, lse = _FORWARD[backend](*args)
    else:
        out, lse = _attention_op(*args, backend)
    return (out, lse) if return_lse else out
