from .boundaries import entropy_patch_lengths, lengths_to_cu_seqlens, patch_ids, static_patch_lengths

__all__ = ["entropy_patch_lengths", "lengths_to_cu_seqlens", "patch_ids", "static_patch_lengths"]
