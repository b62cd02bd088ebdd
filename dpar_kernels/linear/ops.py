"""Drop-in for torch.nn.functional.linear with a faster CPU kernel at decode shapes (few rows).

At decode time a linear layer multiplies a few rows (the batch) by a weight matrix that is not in cache; BLAS
streams it slowly there, and the C++ op dpar_C::linear (csrc/cpu/linear.cpp) can read it faster (measured per ISA
path: benchmarks/RESULTS.md; backend=None takes it only where dpar_kernels/cpu_choice.json says it won). The kernel
runs for float32 CPU tensors with up to LINEAR_MAX_ROWS rows when no gradient and no autocast is involved; everything
else, and every other device, is torch.nn.functional.linear itself, so the result always matches F.linear to
float32 rounding. Inside torch.compile graphs the kernel is the C++ op (its fake is
registered here), so compiled and eager runs compute the same numbers.
"""
import math

import torch
import torch.nn.functional as F

from .._ops import Prepared, define_op, extension_kernel

_BACKENDS = ("torch", "cpu")


def _flops(x, weight, bias, *args, out_val=None, **kwargs) -> int:
    """One matmul, as torch counts F.linear: 2 * rows * N * K."""
    return 2 * math.prod(x.shape[:-1]) * weight.shape[0] * weight.shape[1]


def _kernel_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Float32 CPU tensors, no autocast, no gradient needed (the kernel has no backward)."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype != torch.float32 or \
            weight.dtype != torch.float32:
        return False
    if torch._C._is_any_autocast_enabled():
        return False
    return not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad or
                                               (bias is not None and bias.requires_grad))


def _validate(x, weight, bias, *, backend) -> Prepared:
    """F.linear's contract (F.linear raises on bad shapes); the "cpu" backend only where the kernel applies."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("linear: x and weight must be tensors")
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"linear: backend must be one of {_BACKENDS} or None, got {backend!r}")
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    return Prepared((x, weight, bias), x.device, _BACKENDS if _kernel_takes(x, weight, bias) else ("torch",),
                    "1-row" if rows == 1 else "rows")


LINEAR = define_op(
    "linear", schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor", validate=_validate,
    fake=lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])), flops=_flops,
    extension_traced=True, native=("torch",), strict_default=False,
    backends={"torch": F.linear, "cpu": extension_kernel("linear")})


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], exactly torch.nn.functional.linear's contract.

    backend None (default): the CPU kernel where it applies (see the module docstring), F.linear elsewhere;
    "torch": always F.linear; "cpu": the C++ op (which itself hands shapes it does not take to at::linear)."""
    return LINEAR(x, weight, bias, backend=backend)
