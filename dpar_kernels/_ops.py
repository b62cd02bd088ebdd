"""One declarative definition per op: ``define_op`` turns an op's backend table, argument contract, fake, backward
and flags into the torch.library custom op, its fake, autograd and autocast rules, FLOP formula, backend resolution
and the eager fast path. Every public op in dpar_kernels is one ``Op``; ``OPS`` lists them (the generic tests walk it).

A call ``op(*args, backend=None)``:
1. casts float tensor arguments to the autocast dtype when the op has ``autocast=True`` and autocast is on;
2. runs ``validate(*args, backend=...)``, the op's one argument contract, which raises TypeError/ValueError naming
   the argument and returns a ``Prepared`` (kernel arguments in schema order, device, backends that take them);
3. resolves the backend (``_dispatch.resolve_backend``, cached);
4. runs it: eagerly, with no dispatch mode, the backend function directly (the *fast path*: the dispatcher round
   trip costs more than a decode-sized kernel), wrapped in a plain autograd.Function with the op's backward when
   a gradient is needed (the custom op's autograd adds Python work in both directions); otherwise through the
   custom op
   ``dpar::<name>`` (with ``backend`` as its last argument), or, for ops with ``extension_traced=True``, the C++ op
   ``dpar_C::<name>`` itself on the cpu/cuda backends (a Python custom op would add Python work per call inside
   compiled decode graphs).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.flop_counter import register_flop_formula

from . import _extension
from ._autocast import cast_for_autocast, register_lower_precision
from ._dispatch import resolve_backend

EXTENSION_BACKENDS = ("cpu", "cuda")  # backends run by the compiled extension dpar_kernels._C


class Prepared(NamedTuple):
    """What an op's ``validate`` returns.

    args: the kernel arguments in schema order (without the backend). device: where they live. supported: the
    backends that can take these arguments (dtype, head dim, ...), in the op's table order. shape_class: the
    class of the call (e.g. "short"/"long" sequences, "train" when a gradient is needed) under which the measured
    CPU choice (_cpu_choice) looks the op up.
    """
    args: tuple
    device: torch.device
    supported: tuple[str, ...]
    shape_class: str = ""


def extension_kernel(name: str) -> Callable:
    """The C++/CUDA op dpar_C::<name> as a plain callable (its inputs' device selects the CPU or CUDA kernel).

    Ops with a direct entry _C.<name> (csrc/eager_calls.cpp: the decode-time forward ops) get that, which calls
    the same registered op without torch.ops' Python argument parsing."""
    direct = getattr(_extension.EXTENSION, name, None)
    if direct is not None:
        return direct

    def call(*args):
        return getattr(torch.ops.dpar_C, name)(*args)

    return call


def triton_kernel(module: str, attr: str) -> Callable:
    """A Triton entry point ``dpar_kernels.<module>.<attr>``, imported on its first call (keeps triton optional)
    and then called directly."""
    cache: list[Callable] = []

    def call(*args):
        if not cache:
            cache.append(getattr(importlib.import_module(f"dpar_kernels.{module}"), attr))
        return cache[0](*args)

    return call


def reject_grad(op: str, **tensors) -> None:
    """Forward-only ops raise instead of silently returning a tensor without gradient."""
    if not torch.is_grad_enabled():
        return
    for name, tensor in tensors.items():
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"{op} has no backward: {name} requires grad; call it under torch.no_grad() "
                             f"or pass {name}.detach()")


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # exact types the fast path takes


def eager_route(backend: str, args: tuple) -> str | None:
    """How an eager call may skip the registered op: "direct" (the backend function itself: no gradient needed),
    "autograd" (a gradient is needed: the backend and the op's backward through a plain autograd.Function,
    _EagerAutograd) or None (the registered op). Eager means: not compiling, no torch dispatch mode active
    (FakeTensor, FlopCounterMode, ...), tensor arguments that are plain tensors or nn.Parameters (other subclasses
    have their own dispatch) and, for the torch reference, no autocast (its own matmuls would run at the autocast
    dtype; a custom op runs below autocast). Under torch.compile the registered op is always used, so graphs stay
    whole."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return None
    if backend == "torch" and torch._C._is_any_autocast_enabled():
        return None
    grad, route = torch.is_grad_enabled(), "direct"
    for a in args:  # a plain loop: this runs on every eager call
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return None
            if grad and a.requires_grad:
                route = "autograd"
    return route


class _EagerAutograd(torch.autograd.Function):
    """The eager path of a differentiable op that needs a gradient: the backend function forward and the op's
    Backward (the same setup and backward the custom op registers) called directly, without the custom op's
    dispatcher round trips in each direction."""

    @staticmethod
    def forward(ctx, op, backend, *args):
        output = op.backends[backend](*args)
        op.backward.setup(ctx, (*args, backend), output)
        ctx.rule = op.backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        return None, None, *ctx.rule.backward(ctx, *grads)[:-1]  # no gradient for the op, backend (last input)


@dataclasses.dataclass(frozen=True)
class Backward:
    """An op's gradient: ``setup(ctx, inputs, output)`` saves what ``backward(ctx, *grads)`` needs (inputs end
    with the backend name); as torch.library.register_autograd takes them."""
    backward: Callable
    setup: Callable


class Op:
    """A public op built by ``define_op`` (its docstring explains the arguments); call it with the public arguments
    (see its ops.py) and ``backend=``."""

    def __init__(self, name: str, *, schema: str, backends: dict[str, Callable], validate: Callable | None,
                 fake: Callable, reference: Callable | None = None, mutates_args: tuple[str, ...] = (),
                 backward: Backward | None = None, autocast: bool = False, flops: Callable | None = None,
                 extension_traced: bool = False, native: tuple[str, ...] = (), strict_default: bool = True):
        self.name, self.schema, self.backends, self.validate = name, schema, dict(backends), validate
        self.reference = reference if reference is not None else backends["torch"]
        self.autocast, self.extension_traced, self.native = autocast, extension_traced, native
        self.strict_default, self.backward, self.differentiable = strict_default, backward, backward is not None
        if extension_traced and backward is not None:
            raise ValueError(f"{name}: an op traced as the C++ op has no Python autograd (forward only)")
        self.extension = None
        if extension_traced and _extension.HAS_CPU_OPS:
            self.extension = getattr(torch.ops.dpar_C, name)
            torch.library.register_fake(f"dpar_C::{name}")(fake)
            if flops is not None:
                register_flop_formula(self.extension, get_raw=True)(flops)
        self.custom_op = None
        routed = [b for b in backends if b not in native and not (extension_traced and b in EXTENSION_BACKENDS)]
        if routed:  # backends that run through the Python custom op dpar::<name>
            self.custom_op = _custom_op(name, schema, self.backends, fake, mutates_args)
            if backward is not None:
                self.custom_op.register_autograd(backward.backward, setup_context=backward.setup)
            if autocast:
                register_lower_precision(f"dpar::{name}")
            if flops is not None:
                register_flop_formula(getattr(torch.ops.dpar, name), get_raw=True)(flops)

    @property
    def backend_names(self) -> tuple[str, ...]:
        return tuple(self.backends)

    def __call__(self, *args, backend: str | None = None):
        if self.autocast and torch._C._is_any_autocast_enabled():
            args = _autocast_args(args)
        prepared = self.validate(*args, backend=backend)
        chosen = resolve_backend(self.name, backend, prepared.device, prepared.supported,
                                 strict_default=self.strict_default, shape_class=prepared.shape_class)
        return self.run(chosen, prepared.args)

    def run(self, backend: str, args: tuple):
        """Runs validated kernel ``args`` on ``backend``: the fast path when allowed, else the registered op."""
        if backend in self.native:
            return self.backends[backend](*args)
        route = eager_route(backend, args)
        if route == "direct":
            return self.backends[backend](*args)
        if route == "autograd" and self.backward is not None:
            return _EagerAutograd.apply(self, backend, *args)
        if self.extension is not None and backend in EXTENSION_BACKENDS:
            return self.extension(*args)
        return self.custom_op(*args, backend)


def _autocast_args(args: tuple) -> tuple:
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None:
        return args
    return tuple(cast_for_autocast(device, a)[0] if isinstance(a, torch.Tensor) else a for a in args)


def _custom_op(name: str, schema: str, backends: dict[str, Callable], fake: Callable, mutates_args):
    """dpar::<name> with ``schema`` plus a trailing ``str backend`` argument, dispatching to ``backends``."""
    def impl(*args):
        return backends[args[-1]](*args[:-1])

    op = torch.library.custom_op(f"dpar::{name}", impl, mutates_args=mutates_args,
                                 schema=schema.replace(") ->", ", str backend) ->", 1))
    op.register_fake(lambda *args: fake(*args[:-1]))
    return op


OPS: dict[str, Op] = {}  # every op defined, by name


def define_op(name: str, **definition) -> Op:
    """Defines op ``name`` once (see the module docstring) from keyword arguments:

    schema: the kernel arguments and results, torch.library syntax without the backend, e.g.
        "(Tensor x, Tensor cu_tokens, SymInt total) -> Tensor".
    backends: backend name -> function taking the kernel arguments. validate: the argument contract,
        ``validate(*public_args, backend=...) -> Prepared`` (None for internal ops such as a backward, which run
        through ``Op.run`` and are not listed in OPS). fake: the shape function of the kernel arguments.
    reference: the pure-PyTorch reference the tests compare every backend with (naive.py; default: the "torch"
        backend). mutates_args: names of the arguments written in place. backward: the gradient (differentiable
        ops). autocast: cast float inputs to the autocast dtype. flops: a torch.utils.flop_counter formula (raw).
    extension_traced: cpu/cuda trace as dpar_C::<name> itself (forward-only ops). native: backends that are
        torch's own composite ops (traced and differentiated by torch), always called directly. strict_default:
        False lets a process default (DPAR_BACKEND) that the op cannot run fall back to the automatic choice (ops
        that model code calls everywhere, e.g. linear).
    """
    if name in OPS:
        raise ValueError(f"op {name!r} is already defined")
    op = Op(name, **definition)
    if op.validate is not None:
        OPS[name] = op
    return op
