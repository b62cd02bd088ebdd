"""Public patch ops: patch_gather (max/sum/mean over each patch's tokens) and patch_scatter (broadcast back).

Both are differentiable custom ops; each backward is itself a custom op running on the same backend. Each has one
float input, so they run in its dtype under torch.autocast (nothing to mix; a max or a copy gains nothing from a
cast).
"""
import torch

from .._checks import check_cu_seqlens, check_float, check_index, check_tensor
from .._dispatch import resolve_backend, supported_for_dtype
from .._ops import direct_call_ok, extension_op, lazy
from . import naive

REDUCTIONS = ("max", "sum", "mean")

_GATHER = {
    "torch": naive.patch_gather,
    "cpu": extension_op("patch_gather"),
    "cuda": extension_op("patch_gather"),
    "triton": lazy(".gather_scatter.triton_kernels", "patch_gather"),
}
_GATHER_BACKWARD = {
    "torch": naive.patch_gather_backward,
    "cpu": extension_op("patch_gather_backward"),
    "cuda": extension_op("patch_gather_backward"),
    "triton": lazy(".gather_scatter.triton_kernels", "patch_gather_backward"),
}
_SCATTER = {
    "torch": naive.patch_scatter,
    "cpu": extension_op("patch_scatter"),
    "cuda": extension_op("patch_scatter"),
    "triton": lazy(".gather_scatter.triton_kernels", "patch_scatter"),
}


@torch.library.custom_op("dpar::patch_gather", mutates_args=())
def _gather_op(x: torch.Tensor, cu_tokens: torch.Tensor, reduce: str, with_argmax: bool, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """with_argmax: for "max", also return the arg-max (needed only for the backward); else it is empty."""
    out, argmax = _GATHER[backend](x, cu_tokens, reduce, with_argmax)
    return out, argmax


@_gather_op.register_fake
def _(x, cu_tokens, reduce, with_argmax, backend):
    out = x.new_empty(cu_tokens.shape[0] - 1, x.shape[1])
    argmax_shape = out.shape if reduce == "max" and with_argmax else (0,)
    return out, x.new_empty(argmax_shape, dtype=torch.int32)


@torch.library.custom_op("dpar::patch_gather_backward", mutates_args=())
def _gather_backward_op(grad_out: torch.Tensor, cu_tokens: torch.Tensor, argmax: torch.Tensor, total: int,
                        reduce: str, backend: str) -> torch.Tensor:
    return _GATHER_BACKWARD[backend](grad_out.contiguous(), cu_tokens, argmax, total, reduce)


@_gather_backward_op.register_fake
def _(grad_out, cu_tokens, argmax, total, reduce, backend):
    return grad_out.new_empty(total, grad_out.shape[1])


def _gather_setup(ctx, inputs, output):
    x, cu_tokens, reduce, _with_argmax, backend = inputs
    ctx.save_for_backward(cu_tokens, output[1])
    ctx.total, ctx.reduce, ctx.backend = x.shape[0], reduce, backend


def _gather_backward(ctx, grad_out, _grad_argmax):
    cu_tokens, argmax = ctx.saved_tensors
    if ctx.reduce == "max" and argmax.numel() != grad_out.numel():
        raise RuntimeError("patch_gather(reduce='max') ran without its arg-max, so it has no gradient; "
                           "call it with with_argmax=True")
    grad_x = _gather_backward_op(grad_out, cu_tokens, argmax, ctx.total, ctx.reduce, ctx.backend)
    return grad_x, None, None, None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("dpar::patch_scatter", mutates_args=())
def _scatter_op(y: torch.Tensor, cu_tokens: torch.Tensor, total: int, backend: str) -> torch.Tensor:
    return _SCATTER[backend](y, cu_tokens, total)


@_scatter_op.register_fake
def _(y, cu_tokens, total, backend):
    return y.new_empty(total, y.shape[1])


def _scatter_setup(ctx, inputs, output):
    _y, cu_tokens, _total, backend = inputs
    ctx.save_for_backward(cu_tokens)
    ctx.backend = backend


def _scatter_backward(ctx, grad_out):
    (cu_tokens,) = ctx.saved_tensors
    grad_y = _gather_op(grad_out.contiguous(), cu_tokens, "sum", False, ctx.backend)[0]
    return grad_y, None, None, None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def _rows(name: str, x: torch.Tensor) -> torch.Tensor:
    check_float(name, x, ndim=2)
    return x if x.stride()[-1] == 1 else x.contiguous()


def patch_gather(x: torch.Tensor, cu_tokens: torch.Tensor, *, reduce: str = "max",
                 backend: str | None = None) -> torch.Tensor:
    """Reduces each patch's tokens to one row.

    x [total_tokens, D] fp32/fp16/bf16 (fp64 on torch/cpu), cu_tokens int32 [P+1] token offsets of each patch.
    Returns [P, D] in x's dtype. reduce: "max" (gradient to the first arg-max token), "sum" or "mean".
    An empty patch gives 0 for every reduction and passes no gradient. "sum" and "mean" accumulate in float32
    (float64 for float64 x) on every backend, rounding once to x's dtype.

    NaN/inf (the same on every backend): a NaN token makes its patch's column NaN for every reduction (a NaN
    column of "max" has no arg-max and passes no gradient); +-inf propagate as in IEEE arithmetic (inf + -inf is
    NaN); a sum that overflows x's dtype is inf.
    """
    x = _rows("x", x)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    check_cu_seqlens("cu_tokens", cu_tokens, x.shape[0], x.device)
    backend = resolve_backend("patch_gather", backend, x.device, supported_for_dtype(tuple(_GATHER), x.dtype))
    cu_tokens = cu_tokens.contiguous()  # kernels read offsets as raw memory
    if direct_call_ok(backend, x, cu_tokens):  # no gradient: no arg-max either
        return _GATHER[backend](x, cu_tokens, reduce, False)[0]
    with_argmax = reduce == "max" and x.requires_grad and torch.is_grad_enabled()  # the backward's routing
    return _gather_op(x, cu_tokens, reduce, with_argmax, backend)[0]


def patch_scatter(y: torch.Tensor, cu_tokens: torch.Tensor, *, total_tokens: int | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Broadcasts each patch row to its tokens: y [P, D], cu_tokens int32 [P+1] -> [total_tokens, D].

    total_tokens (optional, an int of any integer kind) saves reading cu_tokens[-1] from the device; it must equal it.
    Backward is the segment sum. NaN/inf rows are copied as they are (every backend).
    """
    y = _rows("y", y)
    check_tensor("cu_tokens", cu_tokens)
    if cu_tokens.dim() == 1 and cu_tokens.numel() != y.shape[0] + 1:
        raise ValueError(f"cu_tokens must have P+1={y.shape[0] + 1} entries for y with P={y.shape[0]} rows, "
                         f"got {cu_tokens.numel()}")
    if total_tokens is None:
        if cu_tokens.numel() == 0:
            raise ValueError("cu_tokens must be a non-empty int32 tensor")
        total_tokens = int(cu_tokens[-1].item())
    total_tokens = check_index("total_tokens", total_tokens)
    check_cu_seqlens("cu_tokens", cu_tokens, total_tokens, y.device)
    backend = resolve_backend("patch_scatter", backend, y.device, supported_for_dtype(tuple(_SCATTER), y.dtype))
    return _scatter_op(y, cu_tokens.contiguous(), total_tokens, backend)
