"""`dpar patchify`: per-token entropies and DPAR patches of a token dataset, from a trained entropy model.

The result (a .pt file of tensors, see PatchTable) is aligned with the dataset's item order and is what
``dpar train dpar --patches FILE`` reads. The threshold is given (``--threshold``) or chosen as the entropy
quantile whose patches give a target reduction of global tokens (``--target-reduction``).
"""
from __future__ import annotations

import argparse

import torch

import dpar_kernels as dk

FORMAT = "dpar-patches-v1"


def check_entropy_vocab(entropy_model: torch.nn.Module, dataset, checkpoint: str = "the entropy model") -> None:
    """ValueError when the dataset's codes reach past the entropy model's vocabulary (its embedding would fail)."""
    vocab = entropy_model.config.vocab_size
    if dataset.vocab_size > vocab:
        raise ValueError(f"{checkpoint} has a vocabulary of {vocab} codes but the dataset {dataset.root!r} has "
                         f"{dataset.vocab_size}; train the entropy model on this dataset's tokenizer")


@torch.no_grad()
def dataset_entropies(entropy_model: torch.nn.Module, dataset, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """float32 [N, T]: H_i of every item of ``dataset`` (in item order) under ``entropy_model``."""
    rows = []
    for start in range(0, len(dataset), batch_size):
        tokens = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        rows.append(entropy_model.entropies(tokens.to(device)).float().cpu())
    return torch.cat(rows) if rows else torch.empty(0, dataset.tokens_per_image)


def count_patches(entropies: torch.Tensor, threshold: float, max_patch_size: int, row_width: int) -> int:
    lengths, _ = dk.entropy_patch_lengths(entropies, threshold=threshold, max_patch_size=max_patch_size,
                                          row_width=row_width)
    return lengths.numel()


def threshold_for_reduction(entropies: torch.Tensor, reduction: float, max_patch_size: int, row_width: int,
                            iterations: int = 40) -> float:
    """The smallest entropy quantile t whose patches number at most N*T/reduction (bisection on the quantile).

    ValueError when even the largest threshold cannot reach ``reduction`` (rows and max_patch_size cap it).
    """
    if not reduction >= 1:  # NaN included
        raise ValueError(f"target reduction must be >= 1, got {reduction}")
    values = entropies.reshape(-1).sort().values
    target = entropies.numel() / reduction

    def at_quantile(q: float) -> float:
        return float(values[round(q * (values.numel() - 1))])

    best = count_patches(entropies, at_quantile(1.0), max_patch_size, row_width)
    if best > target:
        raise ValueError(f"target reduction {reduction} is out of reach: with max_patch_size={max_patch_size} and "
                         f"rows of {row_width} the largest is {entropies.numel() / best:.3f}")
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if count_patches(entropies, at_quantile(middle), max_patch_size, row_width) <= target:
            high = middle
        else:
            low = middle
    return at_quantile(high)


class PatchTable:
    """Patches of every dataset item: patch_lengths int32 [P], cu_patches int32 [N+1], entropies float32 [N, T]."""

    def __init__(self, patch_lengths: torch.Tensor, cu_patches: torch.Tensor, entropies: torch.Tensor,
                 threshold: float, max_patch_size: int, grid_width: int):
        self.patch_lengths, self.cu_patches, self.entropies = patch_lengths, cu_patches, entropies
        self.threshold, self.max_patch_size, self.grid_width = float(threshold), int(max_patch_size), grid_width

    @classmethod
    def from_entropies(cls, entropies: torch.Tensor, threshold: float, max_patch_size: int,
                       grid_width: int) -> PatchTable:
        lengths, cu = dk.entropy_patch_lengths(entropies, threshold=threshold, max_patch_size=max_patch_size,
                                               row_width=grid_width)
        return cls(lengths, cu, entropies, threshold, max_patch_size, grid_width)

    def __len__(self) -> int:
        return self.cu_patches.numel() - 1

    @property
    def reduction(self) -> float:
        """Tokens per global patch token: N*T / P."""
        return self.entropies.numel() / max(self.patch_lengths.numel(), 1)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` int [B] -> (patch_lengths int32 [P_b], cu_patches int32 [B+1]) of that batch."""
        indices = indices.long()
        starts, counts = self.cu_patches[indices].long(), (self.cu_patches[indices + 1] - self.cu_patches[indices])
        cu = dk.lengths_to_cu_seqlens(counts)
        offsets = torch.arange(int(cu[-1])) - torch.repeat_interleave(cu[:-1].long() - starts, counts.long())
        return self.patch_lengths[offsets], cu

    def save(self, path: str) -> None:
        torch.save({"format": FORMAT, "patch_lengths": self.patch_lengths, "cu_patches": self.cu_patches,
                    "entropies": self.entropies, "threshold": self.threshold,
                    "max_patch_size": self.max_patch_size, "grid_width": self.grid_width}, path)

    @classmethod
    def load(cls, path: str, dataset=None) -> PatchTable:
        """Load a patchify file; with ``dataset``, check it describes that dataset (ValueError naming the file)."""
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as error:
            raise ValueError(f"patches file {path} is not readable: {error}") from error
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ValueError(f"patches file {path} is not a {FORMAT} file")
        table = cls(saved["patch_lengths"], saved["cu_patches"], saved["entropies"], saved["threshold"],
                    saved["max_patch_size"], saved["grid_width"])
        if dataset is not None and (len(table) != len(dataset) or table.grid_width != dataset.grid_width
                                    or table.entropies.shape[1] != dataset.tokens_per_image):
            raise ValueError(f"patches file {path} describes {len(table)} items of {table.entropies.shape[1]} tokens "
                             f"(width {table.grid_width}); the dataset has {len(dataset)} of "
                             f"{dataset.tokens_per_image} (width {dataset.grid_width})")
        return table


def patchify(data: str, entropy_ckpt: str, out: str, *, threshold: float | None = None,
             target_reduction: float | None = None, max_patch_size: int = 4, batch_size: int = 64,
             device: str = "cpu") -> PatchTable:
    """Score ``data`` with the entropy model of ``entropy_ckpt``, cut patches, save them to ``out``."""
    from .builders import load_model
    from .data import TokenGridDataset

    if (threshold is None) == (target_reduction is None):
        raise ValueError("give exactly one of threshold and target_reduction")
    dataset = TokenGridDataset(data)
    model, _ = load_model(entropy_ckpt, "entropy", device)
    check_entropy_vocab(model, dataset, entropy_ckpt)
    entropies = dataset_entropies(model, dataset, batch_size, device)
    if threshold is None:
        threshold = threshold_for_reduction(entropies, target_reduction, max_patch_size, dataset.grid_width)
    table = PatchTable.from_entropies(entropies, threshold, max_patch_size, dataset.grid_width)
    table.save(out)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="token dataset root (codes/, labels/)")
    parser.add_argument("--entropy-ckpt", required=True, help="checkpoint of a trained entropy model")
    parser.add_argument("--out", required=True, help="output .pt file")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--threshold", type=float, help="entropy threshold in nats")
    choice.add_argument("--target-reduction", type=float, help="choose the threshold that gives this T/P")
    parser.add_argument("--max-patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> None:
    table = patchify(args.data, args.entropy_ckpt, args.out, threshold=args.threshold,
                     target_reduction=args.target_reduction, max_patch_size=args.max_patch_size,
                     batch_size=args.batch_size, device=args.device)
    print(f"{len(table)} items, threshold {table.threshold:.4f} nats, reduction {table.reduction:.3f}x -> {args.out}")
