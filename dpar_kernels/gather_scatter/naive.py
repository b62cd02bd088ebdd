"""Pure-PyTorch patch gather/scatter: the reference for tests, and the "torch" backend's scatter, arg-max and backward.

Shapes: x [T, D] packed tokens, cu_tokens int32 [P+1] token offsets of each patch, y [P, D] patch rows.
"""
import torch


def segment_ids(cu_tokens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total]: the patch index of every token."""
    lengths = (cu_tokens[1:] - cu_tokens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_tokens.device), lengths,
                                   output_size=total)


def patch_gather(x: torch.Tensor, cu_tokens: torch.Tensor, reduce: str, with_argmax: bool):
    """-> (out [P, D], argmax int32 [P, D]: for "max" with with_argmax, the first arg-max token, -1 for an empty
    patch or a NaN column; otherwise an empty int32 tensor). Max and mean of an empty patch are 0."""
    num_patches, total = cu_tokens.numel() - 1, x.shape[0]
    ids = segment_ids(cu_tokens, total)
    lengths = (cu_tokens[1:] - cu_tokens[:-1]).long()
    no_argmax = torch.empty(0, dtype=torch.int32, device=x.device)
    if reduce in ("sum", "mean"):  # accumulated in float32 (float64 for float64 x), rounded once at the end
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = torch.zeros(num_patches, x.shape[1], dtype=acc, device=x.device).index_add_(0, ids, x.to(acc))
        if reduce == "mean":
            out = out / lengths.to(acc).clamp(min=1)[:, None]
        return out.to(x.dtype), no_argmax
    out = x.new_full((num_patches, x.shape[1]), float("-inf"))
    out = out.scatter_reduce(0, ids[:, None].expand_as(x), x, reduce="amax", include_self=True)
    empty = (lengths == 0)[:, None]
    if not with_argmax:
        return torch.where(empty, torch.zeros_like(out), out), no_argmax
    # first token of each patch that reaches the max: smallest token index among the hits
    token_index = torch.arange(total, device=x.device)[:, None].expand_as(x)
    hit = x == out[ids]
    candidate = torch.where(hit, token_index, torch.full_like(token_index, total))
    argmax = torch.full((num_patches, x.shape[1]), total, dtype=torch.long, device=x.device)
    argmax = argmax.scatter_reduce(0, ids[:, None].expand_as(x), candidate, reduce="amin", include_self=True)
    out = torch.where(empty, torch.zeros_like(out), out)
    argmax = torch.where(empty | (argmax == total), torch.full_like(argmax, -1), argmax)
    return out, argmax.to(torch.int32)


def patch_gather_backward(grad_out, cu_tokens, argmax, total: int, reduce: str) -> torch.Tensor:
    """grad_out [P, D] -> grad_x [total, D]."""
    if reduce == "max":
        grad_x = grad_out.new_zeros(total + 1, grad_out.shape[1])  # row `total` absorbs empty patches (-1)
        index = torch.where(argmax < 0, torch.full_like(argmax, total), argmax).long()
        grad_x.scatter_(0, index, grad_out)
        return grad_x[:total]
    grad = grad_out
    if reduce == "mean":
        lengths = (cu_tokens[1:] - cu_tokens[:-1]).to(grad_out.dtype)
        grad = grad_out / lengths.clamp(min=1)[:, None]
    return patch_scatter(grad, cu_tokens, total)


def patch_scatter(y: torch.Tensor, cu_tokens: torch.Tensor, total: int) -> torch.Tensor:
    """y [P, D] -> [total, D]: every token gets its patch's row."""
    return y.index_select(0, segment_ids(cu_tokens, total))

