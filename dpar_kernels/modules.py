"""nn.Module wrappers of the ops, drop-in for model code."""
import torch
from torch import nn

from .attention import varlen_attention
from .gather_scatter import patch_gather, patch_scatter
from .linear import linear


class VarlenAttention(nn.Module):
    """forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> out; see dk.varlen_attention."""

    def __init__(self, *, causal: bool = True, softmax_scale: float | None = None, backend: str | None = None):
        super().__init__()
        self.causal, self.softmax_scale, self.backend = causal, softmax_scale, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale=self.softmax_scale, causal=self.causal, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, softmax_scale={self.softmax_scale}, backend={self.backend}"


class PatchGather(nn.Module):
    """forward(x [T, D], cu_tokens [P+1]) -> [P, D]; see dk.patch_gather."""

    def __init__(self, reduce: str = "max", *, backend: str | None = None):
        super().__init__()
        self.reduce, self.backend = reduce, backend

    def forward(self, x: torch.Tensor, cu_tokens: torch.Tensor) -> torch.Tensor:
        return patch_gather(x, cu_tokens, reduce=self.reduce, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, backend={self.backend}"


class PatchScatter(nn.Module):
    """forward(y [P, D], cu_tokens [P+1], total_tokens=None) -> [T, D]; see dk.patch_scatter."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, y: torch.Tensor, cu_tokens: torch.Tensor, total_tokens: int | None = None) -> torch.Tensor:
        return patch_scatter(y, cu_tokens, total_tokens=total_tokens, backend=self.backend)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is dk.linear: the CPU decode-shape kernel for few
    float32 rows without gradient, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
