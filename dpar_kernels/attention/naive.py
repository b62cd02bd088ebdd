"""Pure-PyTorch varlen attention: the reference for tests (sequences padded in length-sorted groups, so it runs as a
few batched matmuls), and the "torch" backend where torch_backend.py cannot use torch's fused kernel.

q [total_q, Hq, d], k/v [total_k, Hk, d], cu_seqlens_q/k int32 [B+1]. Causal masks bottom-right aligned:
query j of a length-Lq sequence with Lk keys sees keys 0 .. Lk-Lq+j. A query that sees no key outputs 0 and
has log-sum-exp -inf. Computes in float64 for float64 inputs, else float32. NaN propagates: a NaN in a query row,
or in a key/value row a query sees, makes that query's output row NaN and its log-sum-exp -inf (no finite
normaliser), as the cpu, cuda and triton kernels do. A NaN v row may also reach queries of its sequence that do not
see that key (probability 0 times NaN) on every backend. +-inf inputs are not given a defined result.
"""
import torch

PADDED_BUDGET = 1 << 24  # most score elements (sequences x heads x Lq x Lk) one padded batch holds


def _buckets(lengths_q: list[int], lengths_k: list[int], heads: int) -> list[list[int]]:
    """Sequences with queries, sorted by length and cut into groups whose padded scores fit PADDED_BUDGET."""
    order = sorted((b for b in range(len(lengths_q)) if lengths_q[b] > 0), key=lambda b: (lengths_k[b], lengths_q[b]))
    groups, group, longest_q, longest_k = [], [], 0, 0
    for b in order:
        lq, lk = max(longest_q, lengths_q[b]), max(longest_k, lengths_k[b], 1)
        if group and (len(group) + 1) * heads * lq * lk > PADDED_BUDGET:
            groups.append(group)
            group, lq, lk = [], lengths_q[b], max(lengths_k[b], 1)
        group.append(b)
        longest_q, longest_k = lq, lk
    return groups + [group] if group else groups


def _rows(starts: torch.Tensor, lengths: torch.Tensor, longest: int):
    """(index [n, longest] of each padded row into the packed rows, valid [n, longest])."""
    position = torch.arange(longest, device=starts.device)
    return starts[:, None] + position[None, :], position[None, :] < lengths[:, None]


def _pad(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Packed rows x [total, H, d] -> [n, longest, H, d], zeros where not valid."""
    return x.new_zeros(*index.shape, *x.shape[1:]).index_put_((valid,), x[index[valid]])


class _Group:
    """Padded views of one group of sequences: index/valid of their query and key rows and the attention mask."""

    def __init__(self, group, bounds_q, bounds_k, causal: bool, device):
        lengths_q = [bounds_q[b + 1] - bounds_q[b] for b in group]
        lengths_k = [bounds_k[b + 1] - bounds_k[b] for b in group]
        self.longest_q, self.longest_k = max(lengths_q), max(max(lengths_k), 1)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        len_q, len_k = as_tensor(lengths_q), as_tensor(lengths_k)
        self.index_q, self.valid_q = _rows(as_tensor([bounds_q[b] for b in group]), len_q, self.longest_q)
        self.index_k, self.valid_k = _rows(as_tensor([bounds_k[b] for b in group]), len_k, self.longest_k)
        query = torch.arange(self.longest_q, device=device)[None, :, None]
        key = torch.arange(self.longest_k, device=device)[None, None, :]
        allowed = self.valid_k[:, None, :] & self.valid_q[:, :, None]
        if causal:
            allowed = allowed & (key <= (len_k - len_q)[:, None, None] + query)
        self.allowed = allowed[:, None]  # [n, 1, Lq, Lk]


def _groups(q, k, cu_seqlens_q, cu_seqlens_k, causal: bool) -> list[_Group]:
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lengths_q = [bounds_q[b + 1] - bounds_q[b] for b in range(len(bounds_q) - 1)]
    lengths_k = [bounds_k[b + 1] - bounds_k[b] for b in range(len(bounds_k) - 1)]
    return [_Group(group, bounds_q, bounds_k, causal, q.device)
            for group in _buckets(lengths_q, lengths_k, q.shape[1])]


def _scores(q, k, allowed, scale: float):
    """q [n, Lq, Hq, d], k [n, Lk, Hk, d] -> masked scores [n, Hq, Lq, Lk] (GQA: each kv head serves its group)."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) * scale
    return scores.masked_fill(~allowed, float("-inf"))


def _probabilities(scores, lse):
    """softmax from the log-sum-exp; rows that see no key (lse -inf) are 0, NaN rows stay NaN."""
    finite = ~torch.isneginf(lse) | scores.isnan().any(-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.where(finite[..., None], probs, torch.zeros_like(probs))


def _fold(grad, heads_kv: int):
    """[n, Lk, Hq, d] -> [n, Lk, Hk, d]: sums the query heads of each kv head."""
    n, lk, hq, d = grad.shape
    return grad.reshape(n, lk, heads_kv, hq // heads_kv, d).sum(3)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float, causal: bool):
    """-> (out [total_q, Hq, d] in q's dtype, lse float32 [Hq, total_q] (float64 for float64 inputs)).

    Sequences are sorted by length and padded in groups (PADDED_BUDGET), so a batch of many short sequences costs a
    few batched matmuls, not a Python loop over sequences."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(q.shape, dtype=compute)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=compute, device=q.device)
    for g in _groups(q, k, cu_seqlens_q, cu_seqlens_k, causal):
        qp, kp, vp = (_pad(t.to(compute), index, valid) for t, index, valid in
                      ((q, g.index_q, g.valid_q), (k, g.index_k, g.valid_k), (v, g.index_k, g.valid_k)))
        scores = _scores(qp, kp, g.allowed, softmax_scale)
        group_lse = torch.logsumexp(scores, dim=-1)  # [n, Hq, Lq]
        vp = vp.repeat_interleave(q.shape[1] // k.shape[1], dim=2)
        group_out = torch.einsum("nhqk,nkhd->nqhd", _probabilities(scores, group_lse), vp)
        rows = g.index_q[g.valid_q]
        out[rows] = group_out[g.valid_q]
        lse[:, rows] = torch.where(group_lse.isnan(), float("-inf"), group_lse).transpose(1, 2)[g.valid_q].T
    return out.to(q.dtype), lse


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                              max_seqlen_k: int, softmax_scale: float, causal: bool):
    """dout [total_q, Hq, d] -> (dq, dk, dv) in the dtypes of q, k, v; analytic, grouped as the forward."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    group_size = q.shape[1] // max(k.shape[1], 1)
    for g in _groups(q, k, cu_seqlens_q, cu_seqlens_k, causal):
        qp, doutp, outp = (_pad(t.to(compute), g.index_q, g.valid_q) for t in (q, dout, out))
        kp, vp = (_pad(t.to(compute), g.index_k, g.valid_k) for t in (k, v))
        lsep = _pad(lse.T.to(compute)[:, :, None], g.index_q, g.valid_q)[..., 0].transpose(1, 2)  # [n, Hq, Lq]
        lsep = torch.where(g.valid_q[:, None, :], lsep, torch.full_like(lsep, float("-inf")))
        scores = _scores(qp, kp, g.allowed, softmax_scale)
        probs = _probabilities(scores, lsep)
        k_rep, v_rep = kp.repeat_interleave(group_size, dim=2), vp.repeat_interleave(group_size, dim=2)
        dv_rep = torch.einsum("nhqk,nqhd->nkhd", probs, doutp)
        dprobs = torch.einsum("nqhd,nkhd->nhqk", doutp, v_rep)
        delta = (doutp * outp).sum(-1).transpose(1, 2)  # [n, Hq, Lq]
        dscores = probs * (dprobs - delta[..., None]) * softmax_scale
        dq_p = torch.einsum("nhqk,nkhd->nqhd", dscores, k_rep)
        dk_p = _fold(torch.einsum("nhqk,nqhd->nkhd", dscores, qp), k.shape[1])
        dv_p = _fold(dv_rep, k.shape[1])
        dq[g.index_q[g.valid_q]] = dq_p[g.valid_q]
        dk[g.index_k[g.valid_k]] = dk_p[g.valid_k]
        dv[g.index_k[g.valid_k]] = dv_p[g.valid_k]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
