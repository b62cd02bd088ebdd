"""Progress of a long command: tqdm bars (elapsed and remaining time) that stay one line per refresh in logs, and
a clock of the run's named phases."""
from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm


class _LineBar(tqdm):
    """tqdm for output that is not a terminal (a log, a pipe): every refresh is a line of its own, the last one
    at close."""

    def display(self, msg=None, pos=None):
        if msg != "":  # "" clears a terminal line: a log keeps its lines
            self.fp.write((self.__str__() if msg is None else msg) + "\n")
            self.fp.flush()
        return False

    def close(self):
        if not self.disable:
            self.display()
        self.leave = False
        super().close()


def bar(total: float, desc: str, unit: str = "step", stream=None, **kwargs) -> tqdm:
    """A tqdm bar on ``stream`` (stderr): redrawn in place on a terminal, a line every 10 s otherwise."""
    stream = stream or sys.stderr
    terminal = hasattr(stream, "isatty") and stream.isatty()
    options = {"mininterval": 0.5 if terminal else 10.0, "dynamic_ncols": terminal, **kwargs}
    return (tqdm if terminal else _LineBar)(total=total, desc=desc, unit=unit, file=stream, **options)


class PhaseClock:
    """Wall seconds of named phases, in the order they first ran (a phase entered twice adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
