"""Python's cyclic garbage collector during training loops: off, with one collection every COLLECT_EVERY steps.

A training step of our models makes no reference cycles (tests/pipeline/test_collector.py), so the automatic
collector only pauses the loop: it runs every few hundred new Python objects (every tensor an op returns is one), and
now and then scans every object of the process. The pauses hit DPAR more than the baseline (more, smaller ops per
step). As Megatron-LM's manual GC: the objects alive when the loop starts are frozen (never scanned again) and the
loop collects every COLLECT_EVERY steps, so cycles a user's model makes are still freed.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

COLLECT_EVERY = 100  # steps between the loop's collections


@contextlib.contextmanager
def manual_collection() -> Iterator[None]:
    """Inside: automatic collection off and the objects alive at entry frozen (unless the caller froze some
    already); the loop calls ``collect_if_due(step)``. On exit the previous state is restored."""
    was_enabled, freezes = gc.isenabled(), gc.get_freeze_count() == 0
    gc.collect()
    if freezes:
        gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if freezes:
            gc.unfreeze()
        if was_enabled:
            gc.enable()


def collect_if_due(step: int) -> None:
    """A full collection after every COLLECT_EVERY-th step (1-based ``step``)."""
    if step % COLLECT_EVERY == 0:
        gc.collect()
