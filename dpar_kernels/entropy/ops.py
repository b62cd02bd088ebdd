"""Public entropy ops: token_entropy and linear_entropy (forward only)."""
import torch

from .._checks import check_float, check_same_device, check_temperature, last_dim_contiguous, supported_backends
from .._ops import Prepared, define_op, extension_kernel, reject_grad, triton_kernel
from ..constants import LINEAR_MAX_ROWS
from . import cpu_linear, naive, torch_backend

SMALL_LOGITS = 1 << 16  # token_entropy calls of at most this many logits (a decode step) form the "small" class


def _float32(kernel):
    """The entropy ops return float32 on every backend (float64 inputs accumulate in float64, then round)."""
    def call(*args):
        entropy = kernel(*args)
        return entropy if entropy.dtype == torch.float32 else entropy.float()
    return call


def _token_entropy_validate(logits, temperature, *, backend) -> Prepared:
    """The argument contract of token_entropy (see its docstring)."""
    check_float("logits", logits, min_ndim=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last dim (the vocabulary)")
    temperature = check_temperature(temperature)
    reject_grad("token_entropy", logits=logits)
    rows = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
    supported = supported_backends(TOKEN_ENTROPY, backend, logits.dtype, "logits")
    shape_class = "small" if logits.numel() <= SMALL_LOGITS else "large"
    return Prepared((last_dim_contiguous(rows), temperature), logits.device, supported, shape_class)


TOKEN_ENTROPY = define_op(
    "token_entropy", schema="(Tensor logits, float temperature) -> Tensor", validate=_token_entropy_validate,
    fake=lambda logits, temperature: logits.new_empty(logits.shape[:-1], dtype=torch.float32),
    reference=_float32(naive.token_entropy),
    backends={"torch": _float32(torch_backend.token_entropy),
              "cpu": _float32(extension_kernel("token_entropy")),
              "cuda": _float32(extension_kernel("token_entropy")),
              "triton": _float32(triton_kernel("entropy.triton_kernels", "token_entropy"))})


def _linear_entropy_validate(hidden, weight, bias, temperature, *, backend) -> Prepared:
    """The argument contract of linear_entropy (see its docstring)."""
    check_float("hidden", hidden, ndim=2)
    check_float("weight", weight, ndim=2)
    if bias is not None:
        check_float("bias", bias, ndim=1)
    device = check_same_device(hidden=hidden, weight=weight, bias=bias)
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
    supported = supported_backends(LINEAR_ENTROPY, backend, hidden.dtype, "hidden, weight, bias")
    # The kernels read rows of hidden and weight and the bias with unit stride; other layouts are copied once.
    args = (last_dim_contiguous(hidden), last_dim_contiguous(weight), last_dim_contiguous(bias), temperature)
    return Prepared(args, device, supported, "decode" if hidden.shape[0] <= LINEAR_MAX_ROWS else "large")


LINEAR_ENTROPY = define_op(
    "linear_entropy", schema="(Tensor hidden, Tensor weight, Tensor? bias, float temperature) -> Tensor",
    validate=_linear_entropy_validate, autocast=True,  # a matmul: autocast's dtype
    fake=lambda hidden, weight, bias, temperature: hidden.new_empty(hidden.shape[0], dtype=torch.float32),
    reference=_float32(naive.linear_entropy),
    backends={"torch": _float32(torch_backend.linear_entropy),
              "cpu": _float32(cpu_linear.linear_entropy),
              "cuda": _float32(triton_kernel("entropy.triton_kernels", "linear_entropy")),
              "triton": _float32(triton_kernel("entropy.triton_kernels", "linear_entropy"))})


def token_entropy(logits: torch.Tensor, *, temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature) over the last dim.

    logits [..., V] fp32/fp16/bf16 (fp64 on the torch and cpu backends); -inf entries are masked vocabulary.
    Returns float32 [...]. Forward only.

    Edge values (the same on every backend): a row that is entirely -inf has no distribution and gives NaN; a NaN
    logit makes its row NaN; +inf logits are not given a defined result. temperature must be finite and > 0
    (ValueError otherwise, NaN included) and is clamped to [1e-20, 1e20]: a huge temperature gives log V (the
    uniform limit), a tiny one log(number of maximal logits) (the arg-max limit), never NaN.
    """
    entropy = TOKEN_ENTROPY(logits, temperature, backend=backend)
    return entropy if logits.dim() == 2 else entropy.reshape(logits.shape[:-1])


def linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   temperature: float = 1.0, backend: str | None = None) -> torch.Tensor:
    """Entropy of softmax((hidden @ weight.T + bias) / temperature) without holding the [N, V] logits.

    hidden [N, D], weight [V, D], bias [V] or None, same float dtype and device. Returns float32 [N].
    The CPU paths chunk over N and V with torch.matmul and merge vocabulary chunks with an online recurrence;
    on GPU a Triton kernel fuses the matmul tile with the entropy update. Forward only. Edge values and temperature
    checks as token_entropy (NaN rows give NaN; temperature finite, > 0, clamped to [1e-20, 1e20]). Under
    torch.autocast, hidden, weight and bias run in the autocast dtype (the entropy still accumulates in fp32).
    """
    return LINEAR_ENTROPY(hidden, weight, bias, temperature, backend=backend)
