from .boundaries import (
                         entropy_patch_lengths,
                         lengths_to_cu_seqlens,
                         next_patch_starts,
                         patch_ids,
                         static_patch_lengths,
                         thresholds,
)

__all__ = ["entropy_patch_lengths", "lengths_to_cu_seqlens", "next_patch_starts", "patch_ids", "static_patch_lengths",
           "thresholds"]
