"""Public varlen attention: block-diagonal (optionally causal) attention over packed sequences.

Same argument order and layout as flash-attn's flash_attn_varlen_func. Differentiable in q, k, v; the backward
is a custom op on the same backend. FLOPs are registered with torch.utils.flop_counter (causal counted exactly).
"""
import math

import torch

from .._checks import (
    check_cu_seqlens,
    check_finite,
    check_float,
    check_index,
    check_same_device,
    check_tensor,
    last_dim_contiguous,
    launch_length,
    supported_backends,
)
from .._ops import Backward, Prepared, define_op, extension_kernel, triton_kernel
from ..constants import ATTENTION_HEAD_DIMS
from . import naive, torch_backend

SHORT_QUERIES = 16  # sequences of at most this many queries (patch cross-attention, decode) form the "short" class

SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
          "SymInt max_seqlen_k, float softmax_scale, bool causal) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
                   "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal) "
                   "-> (Tensor, Tensor, Tensor)")


def _fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[1], q.shape[0], dtype=lse_dtype))


def _backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                   causal):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


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


def _forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, out_val=None, **kwargs) -> int:
    """Two matmuls (QK^T and PV) over the attended pairs, like torch's SDPA formula."""
    causal = args[3] if len(args) > 3 else kwargs["causal"]  # args: max_q, max_k, scale, causal[, backend]
    return 4 * q.shape[1] * q.shape[2] * attended_pairs(cu_seqlens_q, cu_seqlens_k, causal)


def _backward_flops(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *args, out_val=None, **kwargs) -> int:
    """Five matmuls (recomputed QK^T, dP, dV, dQ, dK), like torch's SDPA backward formula."""
    causal = args[3] if len(args) > 3 else kwargs["causal"]
    return 10 * q.shape[1] * q.shape[2] * attended_pairs(cu_seqlens_q, cu_seqlens_k, causal)


BACKWARD = define_op(
    "varlen_attention_backward", schema=BACKWARD_SCHEMA, validate=None, fake=_backward_fake, flops=_backward_flops,
    backends={"torch": torch_backend.varlen_attention_backward,
              "cpu": extension_kernel("varlen_attention_backward"),
              "cuda": extension_kernel("varlen_attention_backward"),
              "triton": triton_kernel("attention.triton_kernels", "varlen_attention_backward")})


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = BACKWARD.run(ctx.backend, (dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args))
    return dq, dk, dv, None, None, None, None, None, None, None


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, *,
              backend) -> Prepared:
    """The argument contract of varlen_attention (see its docstring)."""
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
    supported = supported_backends(VARLEN_ATTENTION, backend, q.dtype, "q, k, v",
                                   kernel_ok=q.shape[2] in ATTENTION_HEAD_DIMS,
                                   kernel_limit=(f"head dim {q.shape[2]}", f"kernel head dims: {ATTENTION_HEAD_DIMS}"))
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else check_finite("softmax_scale", softmax_scale)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    args = (q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
            launch_length(longest_q, max_seqlen_q, q.shape[0]), launch_length(longest_k, max_seqlen_k, k.shape[0]),
            scale, bool(causal))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    shape_class = ("train-" if grad else "") + ("short" if args[5] <= SHORT_QUERIES else "long")
    return Prepared(args, device, supported, shape_class)


VARLEN_ATTENTION = define_op(
    "varlen_attention", schema=SCHEMA, validate=_validate, fake=_fake, flops=_forward_flops, autocast=True,
    backward=Backward(_backward, _setup), reference=naive.varlen_attention,
    backends={"torch": torch_backend.varlen_attention,
              "cpu": extension_kernel("varlen_attention"),
              "cuda": extension_kernel("varlen_attention"),
              "triton": triton_kernel("attention.triton_kernels", "varlen_attention")})


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     softmax_scale: float | None = None, causal: bool = True, return_lse: bool = False,
                     backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
    out, lse = VARLEN_ATTENTION(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                                backend=backend)
    return (out, lse) if return_lse else out
