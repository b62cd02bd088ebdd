"""The "torch" backend of patch_gather: torch's fastest ops for the forward reductions. torch.segment_reduce over the
patch offsets has the least per-call work but runs one thread over the columns, so it serves small calls; larger
ones take naive.py's scatter_reduce / index_add (multi-threaded), as does the arg-max of a differentiable max.
patch_scatter and the backward are index_select / scatter in naive.py already.

Same shapes, dtypes and edge values as naive.py: x [T, D], cu_tokens int32 [P+1] -> (out [P, D], empty int32 argmax).
"""
import torch

from . import naive

SEGMENT_REDUCE_MAX_ELEMENTS = 1 << 14  # calls with more elements than this run naive.py's multi-threaded ops


def patch_gather(x: torch.Tensor, cu_tokens: torch.Tensor, reduce: str, with_argmax: bool):
    """As naive.patch_gather; an empty patch gives 0, sum/mean accumulate in float32 (float64 for float64 x)."""
    if with_argmax or x.numel() > SEGMENT_REDUCE_MAX_ELEMENTS:
        return naive.patch_gather(x, cu_tokens, reduce, with_argmax)
    no_argmax = torch.empty(0, dtype=torch.int32, device=x.device)
    lengths = cu_tokens[1:] - cu_tokens[:-1]
    if reduce == "max":
        out = torch.segment_reduce(x, "max", offsets=cu_tokens, axis=0, unsafe=True)  # -inf for an empty patch
        return out.masked_fill((lengths == 0)[:, None], 0), no_argmax
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.segment_reduce(x.to(acc), "sum", offsets=cu_tokens, axis=0, unsafe=True)
    if reduce == "mean":
        out = out / lengths.to(acc).clamp(min=1)[:, None]
    return out.to(x.dtype), no_argmax
