"""The "torch" backend of token_entropy and linear_entropy: torch's fastest eager ops (softmax, then
torch.special.entr summed over the vocabulary; for linear_entropy one matmul per row block first), in row blocks
that bound the temporaries. naive.py is the reference (log-softmax form, online vocabulary chunks). Same edge values:
-inf logits contribute nothing (entr(0) = 0), an all -inf or NaN row gives NaN, a tiny temperature gives log(number
of maximal logits) because the logits are shifted by their row max before scaling.
"""
import torch

from .naive import compute_dtype

BLOCK_ELEMENTS = 1 << 24  # logits per row block (64 MB in float32)


def _entropy_rows(z: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """z [n, V] -> entropy [n] in ``dtype`` (float32 or float64)."""
    if temperature != 1.0:
        z = (z.to(dtype) - z.amax(-1, keepdim=True).to(dtype)) / temperature
    return torch.special.entr(torch.softmax(z, -1, dtype=dtype)).sum(-1)


def _row_blocks(rows: int, vocab: int):
    step = max(1, BLOCK_ELEMENTS // max(1, vocab))
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [N, V] -> entropy [N] (float64 for float64 logits, else float32)."""
    dtype = compute_dtype(logits.dtype)
    rows, vocab = logits.shape
    if rows * vocab <= BLOCK_ELEMENTS:
        return _entropy_rows(logits, temperature, dtype)
    out = torch.empty(rows, dtype=dtype, device=logits.device)
    for start, end in _row_blocks(rows, vocab):
        out[start:end] = _entropy_rows(logits[start:end], temperature, dtype)
    return out


def linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """hidden [N, D], weight [V, D], bias [V] or None -> entropy of softmax(hidden @ weight.T + bias) [N]."""
    dtype = compute_dtype(hidden.dtype)
    rows, vocab = hidden.shape[0], weight.shape[0]
    out = torch.empty(rows, dtype=dtype, device=hidden.device)
    for start, end in _row_blocks(rows, vocab):
        logits = torch.nn.functional.linear(hidden[start:end], weight, bias)
        out[start:end] = _entropy_rows(logits, temperature, dtype)
    return out
