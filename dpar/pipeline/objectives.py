"""The training objective shared by `dpar train` and `dpar evaluate`: the loss module, the patches of a batch, batch
loading and the held-out loss."""
from __future__ import annotations

import math

import torch
from torch import nn

import dpar_kernels as dk

from ..model.patcher import PatchBatch


class LossModule(nn.Module):
    """forward(tokens, labels, patches) -> ``model.loss(tokens, labels, patches)``, the training loss of any of the
    three models (DDP hooks forward only); ``patches`` is the PatchBatch from ``patch_batch`` (DPAR) or None."""

    def __init__(self, model: nn.Module, grid_width: int):
        super().__init__()
        self.model, self.grid_width = model, grid_width

    def patch_batch(self, lengths_and_offsets, device) -> PatchBatch | None:
        """(patch_lengths, cu_patches) from a PatchSource (or None) -> the PatchBatch, built and validated on the
        host and moved to ``device`` in one copy, so the loss itself never reads the device."""
        if lengths_and_offsets is None:
            return None
        return PatchBatch.from_lengths(*lengths_and_offsets, self.grid_width).to(device)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, patches: PatchBatch | None = None) -> torch.Tensor:
        return self.model.loss(tokens, labels, patches)


class PatchSource:
    """Patches of a batch for DPAR training: from a patchify table, or computed with an entropy model."""

    def __init__(self, table=None, entropy_model=None, threshold=None, max_patch_size=4, grid_width=None):
        self.table, self.entropy_model = table, entropy_model
        self.threshold, self.max_patch_size, self.grid_width = threshold, max_patch_size, grid_width

    def __call__(self, indices: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch_lengths int32 [P], cu_patches int32 [B+1]) of items ``indices`` / token grids ``tokens``."""
        if self.table is not None:
            return self.table.batch(indices)
        entropies = self.entropy_model.entropies(tokens)
        return dk.entropy_patch_lengths(entropies, threshold=self.threshold, max_patch_size=self.max_patch_size,
                                        row_width=self.grid_width)


@torch.no_grad()
def heldout_loss(loss_module, dataset, patch_source=None, batch_size: int = 64, device="cpu") -> float:
    """Mean NLL per token (nats) of ``dataset`` under a LossModule, weighted by batch size.

    Class-label dropout is off (eval mode); ``patch_source`` (PatchSource) cuts DPAR patches.
    """
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(dataset)))
        tokens, labels = dataset.batch(indices)
        tokens, labels = tokens.to(device), labels.to(device)
        patches = loss_module.patch_batch(None if patch_source is None else patch_source(indices, tokens), device)
        total += float(loss_module(tokens, labels, patches)) * len(indices)
        count += len(indices)
    loss_module.train(was_training)
    mean = total / max(count, 1)
    if not math.isfinite(mean):
        raise ValueError(f"the held-out loss is {mean}: the model or the data give non-finite values")
    return mean
