"""Pure-PyTorch varlen attention: a per-sequence loop, the reference for tests and the "torch" backend.

q [total_q, Hq, d], k/v [total_k, Hk, d], cu_seqlens_q/k int32 [B+1]. Causal masks bottom-right aligned:
query j of a length-Lq sequence with Lk keys sees keys 0 .. Lk-Lq+j. A query that sees no key outputs 0 and
has log-sum-exp -inf. Computes in float64 for float64 inputs, else float32. NaN propagates: a NaN in a query row,
or in a key/value row a query sees, makes that query's output row NaN and its log-sum-exp -inf (no finite
normaliser), as the cpu, cuda and triton kernels do. A NaN v row may also reach queries of its sequence that do not
see that key (probability 0 times NaN) on every backend. +-inf inputs are not given a defined result.
"""
import torch


def _sequence_attention(q, k, v, scale: float, causal: bool):
    """q [Lq, Hq, d], k/v [Lk, Hk, d] -> out [Lq, Hq, d], lse [Hq, Lq]."""
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        allowed = torch.arange(lk, device=q.device)[None, :] <= (lk - lq + torch.arange(lq, device=q.device))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = ~torch.isneginf(lse)  # -inf: sees no key (output 0); NaN and +inf propagate
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    probs = torch.where(finite[..., None], probs, torch.zeros_like(probs))
    return torch.einsum("hqk,khd->qhd", probs, v), torch.where(lse.isnan(), float("-inf"), lse)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float, causal: bool):
    """-> (out [total_q, Hq, d] in q's dtype, lse float32 [Hq, total_q] (float64 for float64 inputs))."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(q.shape, dtype=compute)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=compute, device=q.device)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0:
            continue
        o, l = _sequence_attention(q[q0:q1].to(compute), k[k0:k1].to(compute), v[k0:k1].to(compute),
                                   softmax_scale, causal)
        out[q0:q1], lse[:, q0:q1] = o, l
    return out.to(q.dtype), lse


def _sequence_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """Analytic gradients of one sequence; lse [Hq, Lq] from the forward. -> dq, dk [Lk, Hk, d], dv."""
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    group = hq // hk
    k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k_rep) * scale
    if causal:
        allowed = torch.arange(lk, device=q.device)[None, :] <= (lk - lq + torch.arange(lq, device=q.device))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    finite = ~torch.isneginf(lse) | scores.isnan().any(-1)  # a NaN row (lse -inf) propagates NaN gradients
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    probs = torch.where(finite[..., None], probs, torch.zeros_like(probs))
    dv = torch.einsum("hqk,qhd->khd", probs, dout)
    dprobs = torch.einsum("qhd,khd->hqk", dout, v_rep)
    delta = (dout * out).sum(-1).transpose(0, 1)  # [Hq, Lq]
    dscores = probs * (dprobs - delta[..., None]) * scale
    dq = torch.einsum("hqk,khd->qhd", dscores, k_rep)
    dk = torch.einsum("hqk,qhd->khd", dscores, q)
    fold = lambda t: t.reshape(lk, hk, group, -1).sum(2)  # noqa: E731 - sum the query heads of each kv head
    return dq, fold(dk), fold(dv)


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, softmax_scale: float, causal: bool):
    """dout [total_q, Hq, d] -> (dq, dk, dv) in the dtypes of q, k, v."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        grads = _sequence_backward(*(t.to(compute) for t in (dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1],
                                                             out[q0:q1], lse[:, q0:q1])), softmax_scale, causal)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = grads
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
