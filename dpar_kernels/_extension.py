"""Loads the compiled extension ``dpar_kernels._C`` once at import; warns once if it is missing.

The results are plain module constants so that torch.compile can trace backend selection without graph breaks.
"""
import importlib
import warnings


def _load():
    try:
        return importlib.import_module("dpar_kernels._C")  # importing registers torch.ops.dpar_C
    except ImportError as exc:
        warnings.warn(
            f"dpar_kernels._C is not available ({exc}); the 'cpu' and 'cuda' backends are disabled and ops fall "
            "back to Triton or the torch reference. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


EXTENSION = _load()
HAS_CPU_OPS = EXTENSION is not None
HAS_CUDA_OPS = HAS_CPU_OPS and EXTENSION.built_with_cuda()
