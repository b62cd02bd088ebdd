from .ops import linear_entropy, token_entropy

__all__ = ["token_entropy", "linear_entropy"]
