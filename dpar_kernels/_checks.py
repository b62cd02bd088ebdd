"""Input validation shared by every op: clear TypeError/ValueError naming the argument.

Checks that read tensor values (cu_seqlens contents) run eagerly, at most once per tensor version, and are skipped
while torch.compile traces (they would force a graph break) and with DPAR_VALIDATE=0 (read once at import;
``set_validation`` switches them at run time); the kernels themselves clamp their indices, so they never read or
write out of bounds. The checks of every call are a few attribute reads: they sit on the decode path, where a
kernel takes microseconds.
"""
import os

import torch

from .constants import KERNEL_BACKENDS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)
_validate = {"enabled": os.environ.get("DPAR_VALIDATE", "1") != "0"}


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(name: str, x, *, dtypes=None, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")


def check_float(name: str, x, ndim: int | None = None, min_ndim: int | None = None) -> None:
    """x: a float tensor (FLOAT_DTYPES), ``ndim``-D / at least ``min_ndim``-D when given."""
    if (not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPE_SET or (ndim is not None and x.dim() != ndim)
            or (min_ndim is not None and x.dim() < min_ndim)):
        check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=ndim, min_ndim=min_ndim)  # raises the error naming it


def check_same_device(**tensors) -> torch.device:
    """Raises ValueError if the named tensors (None entries ignored) live on different devices."""
    first = device = None
    for key, value in tensors.items():
        if value is None:
            continue
        if device is None:
            first, device = key, value.device
        elif value.device != device:
            raise ValueError(f"{key} is on {value.device} but {first} is on {device}")
    return device


def check_int(name: str, value, minimum: int) -> None:
    """A Python int (bool excluded; TypeError otherwise) of at least ``minimum`` (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def validation_enabled() -> bool:
    """False when value checks of offsets are skipped (DPAR_VALIDATE=0 at import, or set_validation(False)); the
    kernels still clamp their indices."""
    return _validate["enabled"]


def set_validation(enabled: bool) -> None:
    """Switches the value checks of offsets on or off at run time (DPAR_VALIDATE sets the starting state)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _validate["enabled"] = enabled


# Attribute on a validated offsets tensor: (version, last entry, longest segment, device).
_MARK = "_dpar_offsets_checked"


def _version(cu: torch.Tensor) -> int | None:
    try:
        return cu._version
    except RuntimeError:  # inference tensors have no version counter: never cached
        return None


def mark_validated(cu: torch.Tensor, total: int, longest: int) -> torch.Tensor:
    """Records that offsets ``cu`` (as they are now) start at 0, never decrease, end at ``total`` and have
    no segment longer than ``longest`` (it sizes launch grids; an upper bound is fine), so no op reads them to the
    host again. The caller vouches for it (e.g. offsets built on the host and copied to the device), skipped while
    torch.compile traces. cu must be a 1-D int32 tensor (TypeError/ValueError otherwise). Returns ``cu``."""
    _check_offsets_tensor("cu", cu)
    version = _version(cu)
    if version is not None and not _tracing():
        setattr(cu, _MARK, (version, int(total), int(longest), cu.device))
    return cu


def _check_offsets_tensor(name: str, cu) -> None:
    check_tensor(name, cu, ndim=1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (the leading 0)")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int | None:
    """cu: int32 [n+1] offsets: starts at 0, non-decreasing, ends at ``total``, on ``device``.

    Returns the longest segment (0 for none). The values are read to the host at most once per tensor version
    (the result is kept on the tensor, see mark_validated); None, with no value check, while torch.compile traces
    or with validation off, unless the offsets carry a mark (they then skip every check but the total and device).
    """
    if _tracing():
        _check_offsets_tensor(name, cu)
        return None
    mark = getattr(cu, _MARK, None)  # a marked tensor passed the structural checks when it was marked
    if mark is not None and mark[0] == _version(cu) and mark[1] == total and mark[3] == device:
        return mark[2]
    _check_offsets_tensor(name, cu)
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the data is on {device}")
    if not validation_enabled():
        return None
    if mark is None or mark[0] != _version(cu):
        mark = (None, *_read_offsets(name, cu))
        mark_validated(cu, mark[1], mark[2])
    last, longest = mark[1], mark[2]
    if last != total:
        raise ValueError(f"{name} must end at the total length {total}, got {last}")
    return longest


def _read_offsets(name: str, cu: torch.Tensor) -> tuple[int, int]:
    """(last entry, longest segment) of offsets ``cu``, read to the host once; ValueError unless they start at 0
    and never decrease."""
    host = cu.cpu()
    first, last = int(host[0]), int(host[-1])
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    lengths = host[1:] - host[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing")
    return last, int(lengths.max()) if lengths.numel() else 0


def launch_length(longest: int | None, max_seqlen, total):
    """The sequence length a kernel's launch grid is sized for: the validated longest segment, else the caller's
    max_seqlen clamped to the total length (an oversized max_seqlen never grows the grid)."""
    if longest is not None:
        return longest
    if isinstance(max_seqlen, torch.SymInt) or isinstance(total, torch.SymInt):
        return torch.sym_min(max_seqlen, total)  # traced with dynamic shapes: stays symbolic
    return min(max_seqlen, total)  # torch.sym_min of two ints breaks a fullgraph trace on torch 2.11


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def check_index(name: str, value, minimum: int = 0) -> int:
    """An integer argument of any integer kind (int, numpy integer, 0-d integer tensor) as a Python int in
    [minimum, int64 max]; TypeError for other types (bool and float included), ValueError when out of range.
    While torch.compile traces, the value (possibly a symbolic int) passes through unchecked, as the other value
    checks do."""
    if _tracing():
        return value
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int, got a tensor of shape {tuple(value.shape)} and dtype "
                            f"{str(value.dtype).replace('torch.', '')}")
        value = int(value)
    elif isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value.__index__())
    if not minimum <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an int in [{minimum}, 2**63-1], got {value}")
    return value


def check_finite(name: str, value) -> float:
    """A real number that is neither NaN nor +-inf, as a float; TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


TEMPERATURE_RANGE = (1e-20, 1e20)


def check_temperature(value) -> float:
    """A finite temperature > 0, clamped to TEMPERATURE_RANGE so that 1/temperature and (z - max) / temperature
    stay finite in float32 on every backend; beyond the range the entropy has reached its limit (log of the
    number of maximal logits as T -> 0, log V as T -> inf) to float32 precision."""
    check_positive("temperature", value)
    value = check_finite("temperature", value)
    return min(max(value, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


def last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t itself when its last dim has unit stride (other strides free: kernels take them), else a contiguous copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def supported_backends(op, requested: str | None, dtype: torch.dtype, names: str, *, kernel_ok: bool = True,
                       kernel_limit: tuple[str, str] = ("", "")) -> tuple[str, ...]:
    """The backends of ``op``'s table that take inputs ``names`` of ``dtype``: float64 runs on torch/cpu only, and
    the kernel backends (triton, cuda) only when ``kernel_ok``. A forced kernel backend that cannot take them raises
    TypeError (dtype) or ValueError naming why: ``kernel_limit`` = (what, limit), e.g. ("head dim 40",
    "kernel head dims: (32, 64)")."""
    if requested in KERNEL_BACKENDS:
        if dtype == torch.float64:
            raise TypeError(f"backend {requested!r} takes float32/float16/bfloat16 {names}, got float64 "
                            f"(the torch and cpu backends take float64)")
        if not kernel_ok:
            raise ValueError(f"{kernel_limit[0]} is not supported by backend {requested!r} ({kernel_limit[1]}); the "
                             f"torch and cpu backends take any")
    if kernel_ok and dtype != torch.float64:
        return op.backend_names
    return tuple(b for b in op.backend_names if b not in KERNEL_BACKENDS)
