from .boundaries import entropy_patch_lengths, lengths_to_cu_seqlens, patch_ids

__all__ = ["entropy_patch_lengths", "lengths_to_cu_seqlens", "patch_ids"]
