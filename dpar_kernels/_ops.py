"""Helpers for registering ops: lazy backend tables, the forward-only guard and the eager fast path."""
import importlib

import torch

from . import _extension


def extension_op(name: str):
    """The C++/CUDA op torch.ops.dpar_C.<name>; the device of its inputs selects the CPU or CUDA kernel.

    Forward ops that run at decode time have a direct entry _C.<name> (csrc/eager_calls.cpp) that calls the same
    registered op without torch.ops' Python argument parsing; the others go through torch.ops."""
    direct = getattr(_extension.EXTENSION, name, None)
    if direct is not None:
        return direct

    def call(*args):
        return getattr(torch.ops.dpar_C, name)(*args)

    return call


def lazy(module: str, attr: str):
    """A callable that imports ``module`` (relative to dpar_kernels) on first use; keeps triton optional."""

    def call(*args):
        return getattr(importlib.import_module(module, "dpar_kernels"), attr)(*args)

    return call


def reject_grad(op: str, **tensors) -> None:
    """Forward-only ops raise instead of silently returning a tensor without gradient."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{op} has no backward: {name} requires grad; call it under torch.no_grad() "
                             f"or pass {name}.detach()")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # exact types a direct call takes


def direct_call_ok(backend: str, *tensors) -> bool:
    """True when an op may run its ``backend`` function directly instead of through its torch.library custom op (the
    dispatcher round-trip costs 50-250 us per call on CPU, more than a decode-sized kernel): eager mode, no torch
    dispatch mode active (FakeTensor, FlopCounterMode, ...), plain tensors or nn.Parameters (a model's weights; None
    allowed; other subclasses have their own dispatch), no gradient needed, and for the torch reference no autocast
    (its own matmuls would run at the autocast dtype; a custom op's implementation runs below autocast, and the
    compiled kernels call no autocast-sensitive op). Under torch.compile the custom op
    is always used, so graphs stay whole."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if backend == "torch" and torch._C._is_any_autocast_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs on every eager call
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True
