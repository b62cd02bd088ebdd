"""Backend selection shared by every op.

``backend=None`` picks the best available implementation for the tensor's device: "cuda" then "triton" then
"torch" on CUDA tensors ("triton" first for varlen_attention and kvcache_attention), on CPU tensors "cpu" where it
was measured faster than "torch" for this ISA path and shape class (_cpu_choice), else "torch". The environment
variable DPAR_BACKEND sets the default, read once when dpar_kernels is imported (as TRITON_INTERPRET is, by Triton
too); ``set_default_backend`` changes it at run time. A forced backend (argument or default) that cannot run raises
BackendUnavailableError naming why. Resolutions are cached per (op, request, device, supported backends), so an
eager call pays one dict lookup.
"""
import contextlib
import importlib.util
import os

import torch

from . import _cpu_choice, _extension

BACKENDS = ("torch", "cpu", "cuda", "triton")
_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# Per-op exceptions, keyed by (op, device type). The attention ops on CUDA tensors prefer Triton until a GPU
# measures otherwise: its varlen kernels use tensor-core async copies and 16-byte loads (the CUDA kernel scalar
# loads through shared memory), its decode kernel shares each KV tile among the GQA heads and splits by occupancy.
_OP_PREFERENCE = {(op, "cuda"): ("triton", "cuda", "torch") for op in ("varlen_attention", "kvcache_attention")}


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run the op on the given inputs."""


HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # Triton kernels run on CPU tensors
_default = {"backend": os.environ.get("DPAR_BACKEND") or None}
_resolved: dict[tuple, str] = {}  # resolve_backend's results; the key includes everything they depend on


def triton_interpreter() -> bool:
    return TRITON_INTERPRETER


def default_backend() -> str | None:
    """The backend ops use when called with backend=None (None: the best available one)."""
    return _default["backend"]


def set_default_backend(backend: str | None) -> None:
    """Sets the backend ops use when called with backend=None, as DPAR_BACKEND does at import; None restores the
    automatic choice."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    _default["backend"] = backend


def device_guard(t: torch.Tensor):
    """A context making t's CUDA device current (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got {device.type} tensors"
        return None if _extension.HAS_CPU_OPS else "the dpar_kernels._C extension is not built"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device.type} tensors"
        return None if _extension.HAS_CUDA_OPS else "dpar_kernels._C was built without CUDA kernels"
    if backend == "triton":
        if not HAS_TRITON:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
            return None
        return f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    raise AssertionError(backend)


def resolve_backend(op: str, requested: str | None, device: torch.device, supported: tuple[str, ...], *,
                    strict_default: bool = True, shape_class: str = "") -> str:
    """Returns the backend name that ``op`` will run with on ``device``.

    requested: None, or one of BACKENDS. supported: the backends ``op`` can run on these inputs.
    strict_default: when False, a process default (DPAR_BACKEND / set_default_backend) that cannot run here is
    ignored (the automatic choice applies) instead of raising. shape_class: the call's class for the measured CPU
    choice (an automatic choice on CPU tensors takes the C++ kernel only where _cpu_choice says it is faster).
    """
    if torch.compiler.is_compiling():  # traced once per graph: no cache to guard on
        return _resolve(op, requested, device, supported, strict_default, shape_class)
    key = (op, requested, device, supported, strict_default, shape_class, _default["backend"], HAS_TRITON,
           TRITON_INTERPRETER, _extension.HAS_CPU_OPS, _extension.HAS_CUDA_OPS, _cpu_choice.version())
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _resolve(op, requested, device, supported, strict_default, shape_class)
    return backend


def _resolve(op: str, requested: str | None, device: torch.device, supported: tuple[str, ...],
             strict_default: bool = True, shape_class: str = "") -> str:
    forced = requested if requested is not None else _default["backend"]
    if (requested is None and forced is not None and not strict_default
            and (forced not in supported or _why_unavailable(forced, device) is not None)):
        forced = None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {forced!r}")
        if forced not in supported:
            raise BackendUnavailableError(f"{op}: backend {forced!r} is not implemented for these inputs "
                                          f"(it has {supported})")
        reason = _why_unavailable(forced, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} cannot run: {reason}")
        return forced
    for candidate in _OP_PREFERENCE.get((op, device.type)) or _PREFERENCE.get(device.type, ("torch",)):
        if candidate == "cpu" and not _cpu_choice.cpu_kernel_preferred(op, shape_class):
            continue  # not measured faster than the torch backend on this ISA path and shape class
        if candidate in supported and _why_unavailable(candidate, device) is None:
            return candidate
    return "torch"


def available_backends(device: torch.device | str, supported: tuple[str, ...] = BACKENDS) -> list[str]:
    """The backends of ``supported`` that can run on ``device`` ("cpu", "cuda:0" or a torch.device) here."""
    device = torch.device(device)
    return [b for b in supported if _why_unavailable(b, device) is None]
