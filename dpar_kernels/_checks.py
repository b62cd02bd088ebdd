"""Input validation shared by every op: clear TypeError/ValueError naming the argument.

Checks that read tensor values (cu_seqlens contents) run eagerly and are skipped while torch.compile traces,
where they would force a graph break; the kernels themselves never read or write out of bounds.
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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


def check_float(name: str, x, **kwargs) -> None:
    check_tensor(name, x, dtypes=FLOAT_DTYPES, **kwargs)


def check_same_device(**tensors) -> torch.device:
    """Raises ValueError if the named tensors (None entries ignored) live on different devices."""
    named = [(k, v) for k, v in tensors.items() if v is not None]
    device = named[0][1].device
    for key, value in named[1:]:
        if value.device != device:
            raise ValueError(f"{key} is on {value.device} but {named[0][0]} is on {device}")
    return device


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int | None:
    """cu: int32 [n+1] offsets: starts at 0, non-decreasing, ends at ``total``, on ``device``.

    Reads the offsets to the host once and returns the longest segment (0 for none); None while torch.compile
    traces, where value checks are skipped.
    """
    check_tensor(name, cu, ndim=1)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the data is on {device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (the leading 0)")
    if _tracing():
        return None
    host = cu.cpu()
    first, last = int(host[0]), int(host[-1])
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    lengths = host[1:] - host[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if last != total:
        raise ValueError(f"{name} must end at the total length {total}, got {last}")
    return int(lengths.max()) if lengths.numel() else 0


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def check_index(name: str, value, minimum: int = 0) -> int:
    """An integer argument of any integer kind (int, numpy integer, 0-d integer tensor) as a Python int in
    [minimum, int64 max]; TypeError for other types (bool and float included), ValueError when out of range."""
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
