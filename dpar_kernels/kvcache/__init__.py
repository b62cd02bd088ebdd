from .ops import kvcache_attention

__all__ = ["kvcache_attention"]
