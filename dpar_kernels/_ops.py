"""Helpers for registering ops: lazy backend tables and the forward-only guard."""
import importlib

import torch


def extension_op(name: str):
    """The C++/CUDA op torch.ops.dpar_C.<name>; the device of its inputs selects the CPU or CUDA kernel."""

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
