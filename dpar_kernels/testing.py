"""Test utilities for users and for this project's tests and benchmarks.

HostReadCounter counts the calls that read tensor values back to the host (a device sync on a GPU): a hot path
(a training step, a decode step) should make none.

    with HostReadCounter() as counter:
        model.loss(tokens, labels, patches).backward()
    assert counter.count == 0, counter.calls
"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {"item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "nonzero", "numpy"}
_ATEN_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default"}  # nonzero_static: fixed size, no sync


class HostReadCounter(TorchFunctionMode):
    """Counts host reads: the Python calls item, tolist, __int__, __bool__, __float__, __index__, cpu, nonzero,
    numpy and .to("cpu") of a device tensor; and, where no such call is on the stack (e.g. in the backward, which
    the autograd engine runs outside Python's torch-function modes), the aten ops that read a value
    (_local_scalar_dense, nonzero). ``count`` is their number, ``calls`` their names in order."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._depth = 0  # > 0 while a counted Python call runs (its aten ops are not counted again)
        self._aten = _AtenReads(self)

    @property
    def count(self) -> int:
        return len(self.calls)

    def __enter__(self):
        super().__enter__()
        self._aten.__enter__()
        return self

    def __exit__(self, *exc):
        self._aten.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None) or str(func)
        if name not in _READS and not (name == "to" and _moves_to_host(args, kwargs)):
            return func(*args, **kwargs)
        self.calls.append(name)
        self._depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= 1


class _AtenReads(TorchDispatchMode):
    def __init__(self, counter: HostReadCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if self.counter._depth == 0 and (name in _ATEN_READS or (name.startswith("aten._to_copy")
                                                                 and _moves_to_host(args, kwargs))):
            self.counter.calls.append(name)
        return func(*args, **kwargs)


def _moves_to_host(args, kwargs) -> bool:
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return source is not None and source.device.type != "cpu" and target is not None \
        and torch.device(target).type == "cpu"
