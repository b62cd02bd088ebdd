"""Packed patch batches: offsets and positions of the patches of a batch of token grids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import dpar_kernels as dk
from dpar_kernels import mark_validated

if TYPE_CHECKING:
    from .entropy_model import EntropyModel


_TENSORS = ("patch_lengths", "cu_patches", "cu_tokens", "positions", "cu_global", "patch_rows")


@dataclass
class PatchBatch:
    """The patches of B images of T tokens each (tokens packed as [B*T], images in order). All tensors int32.

    patch_lengths [P]; cu_patches [B+1] (patch offsets per image); cu_tokens [P+1] (token offsets of each patch in
    the packed tokens); positions [P, 3] = (row, col_start, col_end) with col_end inclusive; cu_global [B+1]
    offsets of the global sequences [class token] + patches of each image; patch_rows [P]: the global row of each
    patch; max_patch_length / max_global_length: longest patch / global sequence; tokens_per_image: T;
    grid_width: W. Built and validated on the host (from_lengths), so the model reads nothing back from the device.
    """
    patch_lengths: torch.Tensor
    cu_patches: torch.Tensor
    cu_tokens: torch.Tensor
    positions: torch.Tensor
    cu_global: torch.Tensor
    patch_rows: torch.Tensor
    max_patch_length: int
    max_global_length: int
    tokens_per_image: int
    grid_width: int

    @property
    def num_images(self) -> int:
        return self.cu_patches.numel() - 1

    @property
    def num_patches(self) -> int:
        return self.patch_lengths.numel()

    @property
    def num_tokens(self) -> int:
        return self.num_images * self.tokens_per_image

    def patches_per_image(self) -> torch.Tensor:
        """int64 [B]."""
        return (self.cu_patches[1:] - self.cu_patches[:-1]).long()

    def image_of_patch(self) -> torch.Tensor:
        """int64 [P]: the image index of every patch."""
        return self.patch_rows.long() - torch.arange(1, self.num_patches + 1, device=self.patch_rows.device)

    def _mark_offsets(self) -> PatchBatch:
        """Tells the ops that the offsets are valid (checked on the host), so they never read them back."""
        mark_validated(self.cu_tokens, self.num_tokens, self.max_patch_length)
        mark_validated(self.cu_global, self.num_patches + self.num_images, self.max_global_length)
        return self

    def to(self, device) -> PatchBatch:
        """All tensors moved with one copy (from pinned memory and non-blocking from the host to a GPU)."""
        device = torch.device(device)
        tensors = [getattr(self, k) for k in _TENSORS]
        if all(t.device == device for t in tensors):
            return self
        flat = torch.cat([t.reshape(-1) for t in tensors])
        upload = flat.device.type == "cpu" and device.type == "cuda"
        if upload:
            flat = flat.pin_memory()
        parts = flat.to(device, non_blocking=upload).split([t.numel() for t in tensors])
        moved = {k: part.view(t.shape) for k, part, t in zip(_TENSORS, parts, tensors)}
        return PatchBatch(**moved, max_patch_length=self.max_patch_length, max_global_length=self.max_global_length,
                          tokens_per_image=self.tokens_per_image, grid_width=self.grid_width)._mark_offsets()

    def image(self, b: int) -> PatchBatch:
        """The PatchBatch of image b alone."""
        start, end = (int(v) for v in self.cu_patches[b:b + 2].tolist())
        lengths = self.patch_lengths[start:end]
        return PatchBatch.from_lengths(lengths, torch.tensor([0, end - start], dtype=torch.int32), self.grid_width)

    @staticmethod
    def from_lengths(patch_lengths: torch.Tensor, cu_patches: torch.Tensor, grid_width: int) -> PatchBatch:
        """From dk.entropy_patch_lengths' output, on the device of ``patch_lengths``. Built and validated on the
        host (device inputs are read back once). Every image must have the same token count and no patch may cross
        a grid row (both raise ValueError)."""
        if patch_lengths.dim() != 1 or cu_patches.dim() != 1 or cu_patches.numel() < 2:
            raise ValueError("patch_lengths must be [P] and cu_patches [B+1] with B >= 1")
        device = patch_lengths.device
        patch_lengths = patch_lengths.to("cpu", torch.int32)
        cu_patches = cu_patches.to("cpu", torch.int32)
        batch, num_patches = cu_patches.numel() - 1, patch_lengths.numel()
        if int(cu_patches[0]) != 0 or int(cu_patches[-1]) != num_patches or bool((cu_patches.diff() < 1).any()):
            raise ValueError("cu_patches must start at 0, end at P and give every image at least one patch")
        if bool((patch_lengths < 1).any()):
            raise ValueError("patch_lengths must be >= 1")
        cu_tokens = dk.lengths_to_cu_seqlens(patch_lengths)
        total = int(cu_tokens[-1])
        image_tokens = cu_tokens[cu_patches.long()]
        per_image = image_tokens.diff()
        if bool((per_image != per_image[0]).any()):
            raise ValueError(f"every image must have the same number of tokens, got {per_image.tolist()}")
        patches_per_image = cu_patches.diff()
        image = torch.repeat_interleave(torch.arange(batch), patches_per_image.long())
        local_start = (cu_tokens[:-1] - image_tokens[image]).long()
        row, col_start = local_start // grid_width, local_start % grid_width
        col_end = col_start + patch_lengths.long() - 1
        if bool((col_end >= grid_width).any()):
            raise ValueError(f"a patch crosses a grid row (grid_width={grid_width})")
        cu_global = dk.lengths_to_cu_seqlens(patches_per_image + 1)
        patch_rows = torch.arange(1, num_patches + 1) + image
        positions = torch.stack([row, col_start, col_end], 1)
        host = PatchBatch(patch_lengths, cu_patches, cu_tokens, positions.to(torch.int32), cu_global,
                          patch_rows.to(torch.int32), int(patch_lengths.max()), int(patches_per_image.max()) + 1,
                          total // batch, grid_width)
        return host._mark_offsets().to(device)


class Patcher:
    """tokens int64 [B, T] -> PatchBatch, boundaries from the entropy model (dk.entropy_patch_lengths)."""

    def __init__(self, entropy_model: EntropyModel, threshold: float | torch.Tensor, max_patch_size: int,
                 row_width: int | None = None):
        self.entropy_model, self.threshold, self.max_patch_size = entropy_model, threshold, max_patch_size
        self.row_width = entropy_model.config.grid_width if row_width is None else row_width

    def __call__(self, tokens: torch.Tensor) -> PatchBatch:
        entropy = self.entropy_model.entropies(tokens)
        lengths, cu_patches = dk.entropy_patch_lengths(entropy, threshold=self.threshold,
                                                       max_patch_size=self.max_patch_size, row_width=self.row_width)
        return PatchBatch.from_lengths(lengths, cu_patches, self.row_width)
