"""What a user writes without dpar_kernels: padded torch ops with the signatures of the dk ops.

varlen_attention pads the packed sequences to [B, max_seqlen, H, d] and calls
torch.nn.functional.scaled_dot_product_attention with a key-padding + bottom-right causal mask; patch_gather is a
scatter_reduce over the patch ids of the tokens; patch_scatter an index_select. ``swapped_in()`` makes the dpar
model modules use them (they call ``dk.<op>`` on the dpar_kernels module, so those attributes are patched).
The ``backend`` arguments are accepted for drop-in compatibility and ignored.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

import dpar_kernels

_REDUCE = {"max": "amax", "sum": "sum", "mean": "mean"}


def _segments(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [total] (sequence index, position inside the sequence) of every packed row."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                       output_size=total)
    return sequence, torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[sequence]


def _pad(x: torch.Tensor, sequence, position, batch: int, length: int) -> torch.Tensor:
    """Packed rows [total, H, d] -> zero-padded [batch, H, length, d] (SDPA layout)."""
    padded = x.new_zeros(batch, length, *x.shape[1:]).index_put((sequence, position), x)
    return padded.transpose(1, 2)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, softmax_scale=None,
                     causal=True, return_lse=False, backend=None):
    """Padded SDPA with the signature of dk.varlen_attention. q [total_q, Hq, d], k/v [total_k, Hk, d] ->
    [total_q, Hq, d]; a query that sees no key gets 0, like dk. return_lse is not offered (SDPA hides it)."""
    if return_lse:
        raise ValueError("return_lse=True is not supported by the padded SDPA reference")
    batch = cu_seqlens_q.numel() - 1
    seq_q, pos_q = _segments(cu_seqlens_q, q.shape[0])
    seq_k, pos_k = _segments(cu_seqlens_k, k.shape[0])
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[:, None, None]
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[:, None, None]
    query = torch.arange(max_seqlen_q, device=q.device)[None, :, None]
    key = torch.arange(max_seqlen_k, device=q.device)[None, None, :]
    allowed = key < len_k
    if causal:
        allowed = allowed & (key <= len_k - len_q + query)
    sees_a_key = allowed.any(-1, keepdim=True)
    # rows that see no key (and padded rows) attend to key 0 so SDPA yields no NaN; their output is zeroed
    allowed = allowed | (~sees_a_key & (key == 0))
    out = F.scaled_dot_product_attention(
        _pad(q, seq_q, pos_q, batch, max_seqlen_q), _pad(k, seq_k, pos_k, batch, max_seqlen_k),
        _pad(v, seq_k, pos_k, batch, max_seqlen_k), attn_mask=allowed[:, None],
        scale=1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale,
        enable_gqa=q.shape[1] != k.shape[1])
    out = out * sees_a_key[:, None].to(out.dtype)
    return out.transpose(1, 2)[seq_q, pos_q]


def patch_gather(x, cu_tokens, *, reduce="max", backend=None):
    """scatter_reduce with the signature of dk.patch_gather: x [T, D] -> [P, D]; an empty patch gives 0.
    (For "max", autograd splits the gradient between tied maxima where dk picks the first.)"""
    patch, _ = _segments(cu_tokens, x.shape[0])
    out = x.new_zeros(cu_tokens.numel() - 1, x.shape[1])
    return out.scatter_reduce(0, patch[:, None].expand_as(x), x, reduce=_REDUCE[reduce], include_self=False)


def patch_scatter(y, cu_tokens, *, total_tokens=None, backend=None):
    """index_select with the signature of dk.patch_scatter: y [P, D] -> [T, D]."""
    total = int(cu_tokens[-1]) if total_tokens is None else total_tokens
    return y.index_select(0, _segments(cu_tokens, total)[0])


@contextlib.contextmanager
def swapped_in():
    """Within the block, dk.varlen_attention / dk.patch_gather / dk.patch_scatter are the padded ops."""
    replacements = {"varlen_attention": varlen_attention, "patch_gather": patch_gather,
                    "patch_scatter": patch_scatter}
    originals = {name: getattr(dpar_kernels, name) for name in replacements}
    try:
        for name, op in replacements.items():
            setattr(dpar_kernels, name, op)
        yield
    finally:
        for name, op in originals.items():
            setattr(dpar_kernels, name, op)
