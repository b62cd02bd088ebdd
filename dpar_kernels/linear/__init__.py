from .ops import linear

__all__ = ["linear"]
