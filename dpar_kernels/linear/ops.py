"""Drop-in for torch.nn.functional.linear with a faster CPU kernel at decode shapes (few rows).

At decode time a linear layer multiplies a few rows (the batch) by a weight matrix that is not in cache; BLAS
streams it slowly there, and the C++ op dpar_C::linear (csrc/cpu/linear.cpp) reads it about twice as fast
(benchmarks/bench_decode.py). The kernel runs for float32 CPU tensors with up to 32 rows when no gradient and no
autocast is involved; everything else, and every other device, is torch.nn.functional.linear itself, so the result
always matches F.linear to float32 rounding. Inside torch.compile graphs the kernel is the C++ op (its fake is
registered here), so compiled and eager runs compute the same numbers.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .. import _extension
from .._dispatch import BackendUnavailableError, default_backend
from .._ops import direct_call_ok

_BACKENDS = ("torch", "cpu")
KERNEL_MAX_ROWS = 32  # kMaxRows of csrc/cpu/linear.cpp: more rows go to at::linear inside the op


def _fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


if _extension.HAS_CPU_OPS:
    torch.library.register_fake("dpar_C::linear")(_fake)

    @register_flop_formula(torch.ops.dpar_C.linear, get_raw=True)
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


def _backend(backend: str | None, x: torch.Tensor) -> str:
    if backend is None:  # the process default "torch" means the reference everywhere; other defaults don't apply
        return "torch" if default_backend() == "torch" or not _extension.HAS_CPU_OPS else "cpu"
    if backend not in _BACKENDS:
        raise ValueError(f"linear: backend must be one of {_BACKENDS} or None, got {backend!r}")
    if backend == "cpu" and (not _extension.HAS_CPU_OPS or x.device.type != "cpu"):
        raise BackendUnavailableError("linear: backend 'cpu' needs dpar_kernels._C and CPU tensors")
    return backend


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], exactly torch.nn.functional.linear's contract.

    backend None (default): the CPU kernel where it applies (see the module docstring), F.linear elsewhere;
    "torch": always F.linear; "cpu": the C++ op (which itself hands shapes it does not take to at::linear)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("linear: x and weight must be tensors")
    if _backend(backend, x) == "torch" or not _kernel_takes(x, weight, bias):
        return F.linear(x, weight, bias)
    if direct_call_ok("cpu", x, weight, bias):
        return _extension.EXTENSION.linear(x, weight, bias)
    return torch.ops.dpar_C.linear(x, weight, bias)  # traced / seen by a dispatch mode as the C++ op
