"""Mixed precision: ops with several float inputs run in torch.autocast's dtype instead of rejecting a mix.

The public wrappers cast before their dtype checks (cast_for_autocast); the custom ops are also registered with
torch.library.register_autocast, so a direct torch.ops.dpar.* call under autocast is cast the same way.
"""
import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast never touches float64


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs lower-precision ops in on ``device``, or None when autocast is off there."""
    if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_for_autocast(device: torch.device, *tensors):
    """The tensors (None kept) cast to the autocast dtype of ``device`` when autocast is on and they are
    fp32/fp16/bf16; unchanged otherwise."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in _CASTABLE else t for t in tensors)


_LIBRARY = torch.library.Library("dpar", "FRAGMENT")  # holds the autocast kernels


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.device.type == device_type and value.dtype in _CASTABLE:
        return value.to(dtype)
    return value


def register_lower_precision(qualname: str) -> None:
    """Registers custom op ``qualname`` (e.g. "dpar::varlen_attention") for autocast on CPU and CUDA: its float
    inputs are cast to the autocast dtype *of the current context* (torch.library.register_autocast takes one
    fixed dtype, which would turn a bf16 region into fp16), then it runs with autocast off."""
    op = torch._library.utils.lookup_op(qualname)
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def run(*args, _device=device_type, _key=dispatch_key):
            dtype = torch.get_autocast_dtype(_device)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*(_cast(a, _device, dtype) for a in args))

        op.py_impl(dispatch_key)(run)  # the path torch.compile traces
        _LIBRARY.impl(qualname.split("::")[1], lambda _keys, *args, _run=run: _run(*args), key, with_keyset=True)
