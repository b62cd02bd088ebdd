"""Triton patch gather/scatter: one program per (patch, column block), looping over the patch's tokens.

Shapes as in naive.py: x [T, D] (row stride free, stride(1) == 1), cu_tokens int32 [P+1], y/out [P, D].
Accumulation is fp32 (fp64 for fp64 inputs). No atomics: every program owns its output rows. Every program clamps
its patch's token range to [0, total rows], so offsets that lie (validation skipped) never index out of bounds.
"""
import torch
import triton
import triton.language as tl

from .._dispatch import device_guard

_REDUCE_CODE = {"max": 0, "sum": 1, "mean": 2}
_COPY, _MEAN_SPREAD, _ARGMAX_ROUTE = 0, 1, 2  # what a broadcast program writes to each token row


def _block_d(cols: int) -> int:
    return min(triton.next_power_of_2(max(cols, 1)), 1024)


@triton.jit
def _token_range(cu_ptr, patch, total):
    """The patch's token rows [start, stop), clamped to 0 <= start <= stop <= total."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + patch), 0), total)
    stop = tl.minimum(tl.maximum(tl.load(cu_ptr + patch + 1), start), total)
    return start, stop


@triton.jit
def _gather_kernel(x_ptr, cu_ptr, out_ptr, argmax_ptr, cols, total, x_row_stride,
                   REDUCE: tl.constexpr, WITH_ARGMAX: tl.constexpr, ACC_FP64: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    patch = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < cols
    start, stop = _token_range(cu_ptr, patch, total)
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    out_row = patch.to(tl.int64) * cols
    x_row = x_ptr + start.to(tl.int64) * x_row_stride + offs  # advanced one row per token
    if REDUCE == 0:
        acc = tl.full([BLOCK_D], float("-inf"), acc_dtype)
        arg = tl.full([BLOCK_D], -1, tl.int32)
        for t in range(start, stop):
            v = tl.load(x_row, mask=mask, other=0.0).to(acc_dtype)
            x_row += x_row_stride
            # strict >: ties keep the first token; the first token is always taken (all -inf columns);
            # NaN propagates
            take = (v > acc) | (v != v) | (arg < 0)
            acc = tl.where(take, v, acc)
            arg = tl.where(take, t, arg)
        acc = tl.where(stop > start, acc, 0.0)  # empty patch: 0
        if WITH_ARGMAX:
            arg = tl.where(acc != acc, -1, arg)  # a NaN column has no arg-max (as the reference)
            tl.store(argmax_ptr + out_row + offs, arg, mask=mask)
    else:
        acc = tl.zeros([BLOCK_D], acc_dtype)
        for _ in range(start, stop):
            acc += tl.load(x_row, mask=mask, other=0.0).to(acc_dtype)
            x_row += x_row_stride
        if REDUCE == 2:
            acc = acc / tl.maximum(stop - start, 1).to(acc_dtype)
    tl.store(out_ptr + out_row + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _broadcast_kernel(src_ptr, cu_ptr, argmax_ptr, out_ptr, cols, total, src_row_stride,
                      MODE: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes every token row of the patch once: its patch row (COPY), the row / length (MEAN_SPREAD), or the
    row where the token is the column's arg-max and 0 elsewhere (ARGMAX_ROUTE)."""
    patch = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < cols
    start, stop = _token_range(cu_ptr, patch, total)
    row = tl.load(src_ptr + patch.to(tl.int64) * src_row_stride + offs, mask=mask, other=0.0)
    if MODE == 1:
        acc_dtype = tl.float64 if ACC_FP64 else tl.float32
        row = (row.to(acc_dtype) / tl.maximum(stop - start, 1).to(acc_dtype)).to(out_ptr.dtype.element_ty)
    if MODE == 2:
        arg = tl.load(argmax_ptr + patch.to(tl.int64) * cols + offs, mask=mask, other=-1)
    out_row = out_ptr + start.to(tl.int64) * cols + offs  # advanced one row per token
    for t in range(start, stop):
        value = row
        if MODE == 2:
            value = tl.where(arg == t, row, 0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_row, value, mask=mask)
        out_row += cols


def _grid(num_patches: int, cols: int, block: int):
    return (num_patches, triton.cdiv(cols, block))


def patch_gather(x: torch.Tensor, cu_tokens: torch.Tensor, reduce: str, with_argmax: bool):
    """x [T, D] -> (out [P, D], argmax int32 [P, D] for "max" with with_argmax, else an empty int32 tensor);
    see naive.py."""
    num_patches, cols = cu_tokens.numel() - 1, x.shape[1]
    out = torch.empty(num_patches, cols, dtype=x.dtype, device=x.device)
    with_argmax = with_argmax and reduce == "max"
    argmax_shape = (num_patches, cols) if with_argmax else (0,)
    argmax = torch.empty(argmax_shape, dtype=torch.int32, device=x.device)
    if out.numel():
        block = _block_d(cols)
        with device_guard(x):
            _gather_kernel[_grid(num_patches, cols, block)](
                x, cu_tokens, out, argmax, cols, x.shape[0], x.stride(0), REDUCE=_REDUCE_CODE[reduce],
                WITH_ARGMAX=with_argmax, ACC_FP64=x.dtype == torch.float64, BLOCK_D=block)
    return out, argmax


def _broadcast(src: torch.Tensor, cu_tokens: torch.Tensor, argmax: torch.Tensor, total: int, mode: int):
    cols = src.shape[1]
    out = torch.empty(total, cols, dtype=src.dtype, device=src.device)
    num_patches = cu_tokens.numel() - 1
    if out.numel() and num_patches:
        block = _block_d(cols)
        with device_guard(src):
            _broadcast_kernel[_grid(num_patches, cols, block)](
                src, cu_tokens, argmax, out, cols, total, src.stride(0),
                MODE=mode, ACC_FP64=src.dtype == torch.float64, BLOCK_D=block)
    return out


def patch_gather_backward(grad_out, cu_tokens, argmax, total: int, reduce: str) -> torch.Tensor:
    """grad_out [P, D] (contiguous) -> grad_x [total, D]."""
    if reduce == "max":
        return _broadcast(grad_out, cu_tokens, argmax, total, _ARGMAX_ROUTE)
    mode = _MEAN_SPREAD if reduce == "mean" else _COPY
    return _broadcast(grad_out, cu_tokens, grad_out, total, mode)


def patch_scatter(y: torch.Tensor, cu_tokens: torch.Tensor, total: int) -> torch.Tensor:
    """y [P, D] -> [total, D]: every token gets its patch's row."""
    return _broadcast(y, cu_tokens, y, total, _COPY)
