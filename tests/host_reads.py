"""HostReadCounter: counts reads of tensor values into Python (device syncs on a GPU) inside a block.

    with HostReadCounter() as reads:
        run()
    assert reads.count <= limit, reads.calls

Counts the Tensor methods and torch functions named in HOST_READS, whatever the device (on CPU they are the
calls that would sync on a GPU). nonzero_static, which does not sync, is not counted.
"""
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = frozenset({"item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "nonzero"})


class HostReadCounter(TorchFunctionMode):
    """count: reads seen; calls: Counter of them by name."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    @property
    def count(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))
