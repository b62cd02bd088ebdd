from .ops import patch_gather, patch_scatter

__all__ = ["patch_gather", "patch_scatter"]
