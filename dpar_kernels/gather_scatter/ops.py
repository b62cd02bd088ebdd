"""Public patch ops: patch_gather (max/sum/mean over each patch's tokens) and patch_scatter (broadcast back).

Both are differentiable custom ops; each backward is itself a custom op running on the same backend. Each has one
float input, so they run in its dtype under torch.autocast (nothing to mix; a max or a copy gains nothing from a
cast).
"""
import torch

from .._checks import check_cu_seqlens, check_float, check_index, check_tensor, last_dim_contiguous, supported_backends
from .._ops import Backward, Prepared, define_op, extension_kernel, triton_kernel
from . import naive, torch_backend

REDUCTIONS = ("max", "sum", "mean")
SMALL_ROWS = 1 << 14  # calls with at most this many elements (a decode step) form the "small" class


def _shape_class(x: torch.Tensor, grad: bool) -> str:
    return "train" if grad else ("small" if x.numel() <= SMALL_ROWS else "large")


def _gather_fake(x, cu_tokens, reduce, with_argmax):
    out = x.new_empty(cu_tokens.shape[0] - 1, x.shape[1])
    argmax_shape = out.shape if reduce == "max" and with_argmax else (0,)
    return out, x.new_empty(argmax_shape, dtype=torch.int32)


def _gather_backward_kernel(kernel):
    """The backward kernels take a contiguous gradient."""
    def call(grad_out, cu_tokens, argmax, total, reduce):
        return kernel(grad_out.contiguous(), cu_tokens, argmax, total, reduce)
    return call


GATHER_BACKWARD = define_op(
    "patch_gather_backward",
    schema="(Tensor grad_out, Tensor cu_tokens, Tensor argmax, SymInt total, str reduce) -> Tensor",
    validate=None, fake=lambda grad_out, cu_tokens, argmax, total, reduce: grad_out.new_empty(total, grad_out.shape[1]),
    backends={"torch": _gather_backward_kernel(naive.patch_gather_backward),
              "cpu": _gather_backward_kernel(extension_kernel("patch_gather_backward")),
              "cuda": _gather_backward_kernel(extension_kernel("patch_gather_backward")),
              "triton": _gather_backward_kernel(triton_kernel("gather_scatter.triton_kernels",
                                                              "patch_gather_backward"))})


def _gather_setup(ctx, inputs, output):
    x, cu_tokens, reduce, _with_argmax, backend = inputs
    ctx.save_for_backward(cu_tokens, output[1])
    ctx.total, ctx.reduce, ctx.backend = x.shape[0], reduce, backend


def _gather_backward(ctx, grad_out, _grad_argmax):
    cu_tokens, argmax = ctx.saved_tensors
    if ctx.reduce == "max" and argmax.numel() != grad_out.numel():
        raise RuntimeError("patch_gather(reduce='max') ran without its arg-max, so it has no gradient; "
                           "call it with with_argmax=True")
    grad_x = GATHER_BACKWARD.run(ctx.backend, (grad_out, cu_tokens, argmax, ctx.total, ctx.reduce))
    return grad_x, None, None, None, None


def _gather_validate(x, cu_tokens, reduce, *, backend) -> Prepared:
    """The argument contract of patch_gather (see its docstring)."""
    check_float("x", x, ndim=2)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    check_cu_seqlens("cu_tokens", cu_tokens, x.shape[0], x.device)
    with_argmax = reduce == "max" and x.requires_grad and torch.is_grad_enabled()  # the backward's routing
    args = (last_dim_contiguous(x), cu_tokens.contiguous(), reduce, with_argmax)  # kernels read offsets as raw memory
    return Prepared(args, x.device, supported_backends(PATCH_GATHER, backend, x.dtype, "x"),
                    _shape_class(x, with_argmax or (x.requires_grad and torch.is_grad_enabled())))


PATCH_GATHER = define_op(
    "patch_gather", schema="(Tensor x, Tensor cu_tokens, str reduce, bool with_argmax) -> (Tensor, Tensor)",
    validate=_gather_validate, fake=_gather_fake, backward=Backward(_gather_backward, _gather_setup),
    reference=naive.patch_gather,
    backends={"torch": torch_backend.patch_gather,
              "cpu": extension_kernel("patch_gather"),
              "cuda": extension_kernel("patch_gather"),
              "triton": triton_kernel("gather_scatter.triton_kernels", "patch_gather")})


def _scatter_setup(ctx, inputs, output):
    _y, cu_tokens, _total, backend = inputs
    ctx.save_for_backward(cu_tokens)
    ctx.backend = backend


def _scatter_backward(ctx, grad_out):
    (cu_tokens,) = ctx.saved_tensors
    grad_y = PATCH_GATHER.run(ctx.backend, (grad_out.contiguous(), cu_tokens, "sum", False))[0]
    return grad_y, None, None, None


def _scatter_validate(y, cu_tokens, total_tokens, *, backend) -> Prepared:
    """The argument contract of patch_scatter (see its docstring)."""
    check_float("y", y, ndim=2)
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
    args = (last_dim_contiguous(y), cu_tokens.contiguous(), total_tokens)
    return Prepared(args, y.device, supported_backends(PATCH_SCATTER, backend, y.dtype, "y"),
                    _shape_class(y, y.requires_grad and torch.is_grad_enabled()))


PATCH_SCATTER = define_op(
    "patch_scatter", schema="(Tensor y, Tensor cu_tokens, SymInt total) -> Tensor",
    validate=_scatter_validate, fake=lambda y, cu_tokens, total: y.new_empty(total, y.shape[1]),
    backward=Backward(_scatter_backward, _scatter_setup),
    backends={"torch": naive.patch_scatter,
              "cpu": extension_kernel("patch_scatter"),
              "cuda": extension_kernel("patch_scatter"),
              "triton": triton_kernel("gather_scatter.triton_kernels", "patch_scatter")})


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
    return PATCH_GATHER(x, cu_tokens, reduce, backend=backend)[0]


def patch_scatter(y: torch.Tensor, cu_tokens: torch.Tensor, *, total_tokens: int | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Broadcasts each patch row to its tokens: y [P, D], cu_tokens int32 [P+1] -> [total_tokens, D].

    total_tokens (optional, an int of any integer kind) saves reading cu_tokens[-1] from the device; it must equal it.
    Backward is the segment sum. NaN/inf rows are copied as they are (every backend).
    """
    return PATCH_SCATTER(y, cu_tokens, total_tokens, backend=backend)
