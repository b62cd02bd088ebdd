from .ops import attended_pairs, varlen_attention

__all__ = ["varlen_attention", "attended_pairs"]
