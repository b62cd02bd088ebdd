"""Loads the compiled extension ``dpar_kernels._C`` once at import; warns once if it is missing or unusable.

setup.py writes ``_C.build.json`` (the torch version _C was compiled against) next to the library. A _C built
against another torch is not loaded (its C++ ABI would not match): the warning names both versions and the ops
fall back to Triton or the torch reference. The results are plain module constants so that torch.compile can
trace backend selection without graph breaks.
"""
import importlib
import json
import os
import warnings

import torch

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C.build.json")
REBUILD_HINT = "Rebuild it against this torch with `pip install --no-build-isolation -e .` (README, Install)."


def built_against() -> str | None:
    """The torch version recorded when _C was built, or None when no build record exists."""
    try:
        with open(BUILD_INFO) as f:
            return json.load(f).get("torch")
    except (OSError, ValueError):
        return None


def _unavailable(reason: str) -> None:
    warnings.warn(f"dpar_kernels._C is not used: {reason}; the 'cpu' and 'cuda' backends are disabled and ops fall "
                  f"back to Triton or the torch reference. {REBUILD_HINT}", RuntimeWarning, stacklevel=3)


def _load():
    build_torch = built_against()
    if build_torch is not None and build_torch != torch.__version__:
        _unavailable(f"it was built against torch {build_torch} but torch {torch.__version__} is running")
        return None
    try:
        return importlib.import_module("dpar_kernels._C")  # importing registers torch.ops.dpar_C
    except ImportError as exc:
        _unavailable(f"it cannot be imported ({exc})")
        return None


EXTENSION = _load()
HAS_CPU_OPS = EXTENSION is not None
HAS_CUDA_OPS = HAS_CPU_OPS and EXTENSION.built_with_cuda()
CPU_ISA = EXTENSION.cpu_isa() if HAS_CPU_OPS else None
if HAS_CPU_OPS and EXTENSION.cpu_isa_problem():
    warnings.warn(EXTENSION.cpu_isa_problem(), RuntimeWarning, stacklevel=2)


def cpu_isa() -> str | None:
    """The instruction-set path the C++ CPU kernels run: "avx512", "avx2" or "default"; None without dpar_kernels._C.

    Picked once when _C loads, from the CPU's feature bits: the best path the CPU has, or the one DPAR_CPU_ISA names
    when the CPU supports it. A DPAR_CPU_ISA the CPU cannot run (a higher path) or an unknown name warns
    (RuntimeWarning) and runs the best supported path instead.
    """
    return CPU_ISA
