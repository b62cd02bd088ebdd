"""The "torch" backend of varlen_attention: torch's own fused CPU attention kernel (the one SDPA runs on CPU,
aten._scaled_dot_product_flash_attention_for_cpu, and its backward) over the length-sorted padded groups of
naive.py, so a fallback to torch is torch's fastest way, not a reference loop. Same layouts, results and edge
values as naive.py, which it uses where the fused kernel cannot keep them: CUDA tensors, and keys or queries that hold
NaN/inf (the fused kernel masks by adding -inf, which would let a NaN key reach a query that does not see it).
"""
import torch

from . import naive

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _fused(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The fused kernel keeps naive.py's semantics: CPU tensors with finite q and k (one reduction each)."""
    return q.device.type == "cpu" and bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())


def _mask(group, dtype):
    return torch.zeros(group.allowed.shape, dtype=dtype).masked_fill(~group.allowed, float("-inf"))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[n, L, Hk, d] -> [n, Hq, L, d] (GQA: each kv head repeated for its query heads)."""
    return (t if heads == t.shape[2] else t.repeat_interleave(heads // t.shape[2], dim=2)).transpose(1, 2)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float, causal: bool):
    """-> (out [total_q, Hq, d] in q's dtype, lse [Hq, total_q] float32; float64 for float64 inputs)."""
    if not _fused(q, k):
        return naive.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale, causal)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    out = q.new_zeros(q.shape, dtype=compute)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=compute)
    for g in naive._groups(q, k, cu_seqlens_q, cu_seqlens_k, causal):
        qp = naive._pad(q.to(compute), g.index_q, g.valid_q).transpose(1, 2)
        kp, vp = (_heads(naive._pad(t.to(compute), g.index_k, g.valid_k), heads) for t in (k, v))
        group_out, group_lse = _FORWARD(qp, kp, vp, 0.0, False, attn_mask=_mask(g, compute), scale=softmax_scale)
        rows = g.index_q[g.valid_q]
        out[rows] = group_out.transpose(1, 2)[g.valid_q]
        sees = g.allowed.any(-1)  # [n, 1, Lq]: a query that sees no key has lse -inf (the kernel gives 0)
        group_lse = torch.where(sees, group_lse.to(compute), float("-inf"))
        lse[:, rows] = group_lse.transpose(1, 2)[g.valid_q].T
    return out.to(q.dtype), lse


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, softmax_scale: float, causal: bool):
    """dout [total_q, Hq, d] -> (dq, dk, dv) in the dtypes of q, k, v."""
    if not _fused(q, k):
        return naive.varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                               max_seqlen_k, softmax_scale, causal)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, heads_kv = q.shape[1], k.shape[1]
    dq = torch.zeros(q.shape, dtype=compute)
    dk = torch.zeros(k.shape, dtype=compute)
    dv = torch.zeros(v.shape, dtype=compute)
    kernel_lse = torch.where(torch.isneginf(lse), 0.0, lse).T.to(compute)[:, :, None]  # the kernel's 0, not -inf
    for g in naive._groups(q, k, cu_seqlens_q, cu_seqlens_k, causal):
        qp, doutp, outp = (naive._pad(t.to(compute), g.index_q, g.valid_q).transpose(1, 2) for t in (q, dout, out))
        lsep = naive._pad(kernel_lse, g.index_q, g.valid_q)[..., 0].transpose(1, 2).contiguous()
        kp, vp = (_heads(naive._pad(t.to(compute), g.index_k, g.valid_k), heads) for t in (k, v))
        dq_p, dk_p, dv_p = _BACKWARD(doutp.contiguous(), qp, kp, vp, outp.contiguous(), lsep, 0.0, False,
                                     attn_mask=_mask(g, compute), scale=softmax_scale)
        dq[g.index_q[g.valid_q]] = dq_p.transpose(1, 2)[g.valid_q]
        dk[g.index_k[g.valid_k]] = naive._fold(dk_p.transpose(1, 2), heads_kv)[g.valid_k]
        dv[g.index_k[g.valid_k]] = naive._fold(dv_p.transpose(1, 2), heads_kv)[g.valid_k]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
