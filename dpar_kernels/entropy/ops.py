"""Public entropy ops: token_entropy and linear_entropy (forward only)."""
import torch

from .._autocast import cast_for_autocast, register_lower_precision
from .._checks import check_float, check_same_device, check_temperature
from .._dispatch import resolve_backend, supported_for_dtype
from .._ops import direct_call_ok, extension_op, lazy, reject_grad
from . import cpu_linear, naive

_TOKEN_ENTROPY = {
    "torch": naive.token_entropy,
    "cpu": extension_op("token_entropy"),
    "cuda": extension_op("token_entropy"),
    "triton": lazy(".entropy.triton_kernels", "token_entropy"),
}
_LINEAR_ENTROPY = {
    "torch": naive.linear_entropy,
    "cpu": cpu_linear.linear_entropy,
    "cuda": lazy(".entropy.triton_kernels", "linear_entropy"),
    "triton": lazy(".entropy.triton_kernels", "linear_entropy"),
}


def _token_entropy(logits: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    entropy = _TOKEN_ENTROPY[backend](logits, temperature)
    return entropy if entropy.dtype == torch.float32 else entropy.float()


@torch.library.custom_op("dpar::token_entropy", mutates_args=())
def _token_entropy_op(logits: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    return _token_entropy(logits, temperature, backend)


@_token_entropy_op.register_fake
def _(logits, temperature, backend):
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("dpar::linear_entropy", mutates_args=())
def _linear_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       temperature: float, backend: str) -> torch.Tensor:
    return _LINEAR_ENTROPY[backend](hidden, weight, bias, temperature).to(torch.float32)


@_linear_entropy_op.register_fake
def _(hidden, weight, bias, temperature, backend):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


register_lower_precision("dpar::linear_entropy")  # a matmul: autocast's dtype; token_entropy has one float input


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature) over the last dim.

    logits [..., V] fp32/fp16/bf16 (fp64 on the torch and cpu backends); -inf entries are masked vocabulary.
    Returns float32 [...]. Forward only.

    Edge values (the same on every backend): a row that is entirely -inf has no distribution and gives NaN; a NaN
    logit makes its row NaN; +inf logits are not given a defined result. temperature must be finite and > 0
    (ValueError otherwise, NaN included) and is clamped to [1e-20, 1e20]: a huge temperature gives log V (the
    uniform limit), a tiny one log(number of maximal logits) (the arg-max limit), never NaN.
    """
    check_float("logits", logits, min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last dim (the vocabulary)")
    temperature = check_temperature(temperature)
    reject_grad("token_entropy", logits=logits)
    supported = supported_for_dtype(tuple(_TOKEN_ENTROPY), logits.dtype)
    backend = resolve_backend("token_entropy", backend, logits.device, supported)
    rows = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
    if rows.stride()[-1] != 1:
        rows = rows.contiguous()
    run = _token_entropy if direct_call_ok(backend, rows) else _token_entropy_op
    entropy = run(rows, float(temperature), backend)
    return entropy if logits.dim() == 2 else entropy.reshape(logits.shape[:-1])


def linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Entropy of softmax((hidden @ weight.T + bias) / temperature) without holding the [N, V] logits.

    hidden [N, D], weight [V, D], bias [V] or None, same float dtype and device. Returns float32 [N].
    The CPU paths chunk over N and V with torch.matmul and merge vocabulary chunks with an online recurrence;
    on GPU a Triton kernel fuses the matmul tile with the entropy update. Forward only. Edge values and temperature
    checks as token_entropy (NaN rows give NaN; temperature finite, > 0, clamped to [1e-20, 1e20]). Under torch.autocast,
    hidden, weight and bias run in the autocast dtype (the entropy still accumulates in fp32).
    """
    if isinstance(hidden, torch.Tensor):
        hidden, weight, bias = cast_for_autocast(hidden.device, hidden, weight, bias)
    check_float("hidden", hidden, ndim=2)
    check_float("weight", weight, ndim=2)
    if bias is not None:
        check_float("bias", bias, ndim=1)
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] disagree on D: {hidden.shape[1]} vs {weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (the vocabulary)")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have V={weight.shape[0]} entries, got {bias.shape[0]}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype} and {weight.dtype}")
    temperature = check_temperature(temperature)
    reject_grad("linear_entropy", hidden=hidden, weight=weight, bias=bias)
    supported = supported_for_dtype(tuple(_LINEAR_ENTROPY), hidden.dtype)
    backend = resolve_backend("linear_entropy", backend, hidden.device, supported)
    # The kernels read rows of hidden and weight and the bias with unit stride; other layouts are copied once.
    hidden, weight = _unit_last_stride(hidden), _unit_last_stride(weight)
    bias = None if bias is None else _unit_last_stride(bias)
    if direct_call_ok(backend, hidden, weight, bias):  # eager, no grad: skip the dispatcher round trip
        return _LINEAR_ENTROPY[backend](hidden, weight, bias, float(temperature)).to(torch.float32)
    return _linear_entropy_op(hidden, weight, bias, float(temperature), backend)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
