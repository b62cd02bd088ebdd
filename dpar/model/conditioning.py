"""Class conditioning with label dropout (a null class for classifier-free guidance) and input checks."""
import torch
from torch import nn

import dpar_kernels as dk


class ClassEmbedding(nn.Module):
    """labels int64 [B] in [0, num_classes] (num_classes = the null class) -> [B, D].

    In training mode each label is replaced by the null class with probability ``dropout``.
    """

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embed = nn.Embedding(num_classes + 1, width)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.embed(labels)

    def with_null(self, labels: torch.Tensor) -> torch.Tensor:
        """[B] -> [2B]: the labels, then the null class for each (the CFG batch)."""
        return torch.cat([labels, torch.full_like(labels, self.null_class)])


def check_tokens_labels(config, tokens: torch.Tensor, labels: torch.Tensor) -> None:
    """tokens int64 [B, T] (T <= grid tokens; a prefix is allowed), labels int64 [B] in [0, num_classes]."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise TypeError("tokens must be an int64 tensor [B, T]")
    if not 1 <= tokens.shape[1] <= config.tokens_per_image:
        raise ValueError(f"tokens must have 1..{config.tokens_per_image} tokens per image, got {tokens.shape[1]}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != tokens.shape[:1]:
        raise TypeError(f"labels must be an int64 tensor [B={tokens.shape[0]}]")
    _check_range("tokens", tokens, 0, config.vocab_size - 1, f"tokens must be in [0, {config.vocab_size})")
    _check_range("labels", labels, 0, config.num_classes,
                 f"labels must be in [0, {config.num_classes}] ({config.num_classes} = null class)")


def _check_range(name: str, x: torch.Tensor, low: int, high: int, message: str) -> None:
    """ValueError(message) unless low <= x <= high, without reading x to the host: an asynchronous device assert
    (immediate on CPU, raised at the next sync on a GPU); part of the graph under torch.compile. DPAR_VALIDATE=0
    skips it."""
    if x.numel() == 0 or not dk.validation_enabled():
        return
    try:
        torch._assert_async(((x >= low) & (x <= high)).all(), message)
    except RuntimeError as error:
        raise ValueError(message) from error
