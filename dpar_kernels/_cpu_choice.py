"""Which CPU ops run the C++ kernel by default: only where it was measured faster than the torch backend.

The choice is data, not code: ``cpu_choice.json`` beside this file maps an ISA path ("avx512", "avx2", "default",
see ``dk.cpu_isa()``) and an op's shape class (e.g. "varlen_attention/prefill") to "cpu" or "torch", with the
measured ratio, the CPU and the command that produced it. ``python -m benchmarks.cpu_choice --write`` measures this
machine's ISA path (``DPAR_CPU_ISA`` selects a lower one) and rewrites its entries; ``DPAR_CPU_CHOICE=path`` points
at another table. An op, ISA path or shape class without an entry runs the torch backend: the C++ kernel has to
earn its place by a measurement. Forcing ``backend="cpu"`` always runs it.
"""
from __future__ import annotations

import json
import os

from . import _extension

TABLE_PATH = os.environ.get("DPAR_CPU_CHOICE") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                  "cpu_choice.json")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


_TABLE = {"choices": _load(TABLE_PATH).get("choices", {}), "version": 0}


def cpu_isa() -> str:
    """The ISA path the C++ CPU kernels run ("avx512", "avx2" or "default"); "none" without the extension."""
    return _extension.cpu_isa() or "none"


def cpu_kernel_preferred(op: str, shape_class: str) -> bool:
    """True when the table says the C++ kernel of ``op`` beat the torch backend for ``shape_class`` on this ISA
    (the entry "op/shape_class", else "op/*", else "*")."""
    entries = _TABLE["choices"].get(cpu_isa(), {})
    entry = entries.get(f"{op}/{shape_class}") or entries.get(f"{op}/*") or entries.get("*")
    return entry is not None and entry.get("backend") == "cpu"


def set_table(choices: dict) -> None:
    """Replaces the choices in force (tests; the benchmark command while it measures)."""
    _TABLE["choices"] = choices
    _TABLE["version"] += 1


def version() -> int:
    """Changes whenever the choices change (the backend resolution cache keys on it)."""
    return _TABLE["version"]


def table() -> dict:
    """The choices in force: {isa: {"op/shape_class": {"backend": ..., "ratio": ..., ...}}}."""
    return _TABLE["choices"]
