"""DPAR kernels: fused entropy, patch boundaries, patch gather/scatter, varlen attention, KV-cache attention
and a decode-shape linear layer.

Every op takes ``backend=None|"torch"|"cpu"|"cuda"|"triton"`` (see ``_dispatch``) and is a torch custom op.
"""
from importlib.metadata import PackageNotFoundError, version

from ._checks import mark_validated, set_validation, validation_enabled
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends, default_backend, set_default_backend
from ._extension import cpu_isa
from .attention import attended_pairs, varlen_attention
from .entropy import linear_entropy, token_entropy
from .gather_scatter import patch_gather, patch_scatter
from .kvcache import kvcache_attention
from .linear import linear
from .modules import Linear, PatchGather, PatchScatter, VarlenAttention
from .patching import entropy_patch_lengths, lengths_to_cu_seqlens, patch_ids
from .position_ids import cu_seqlens_from_position_ids

try:
    __version__ = version("dpar-kernels")  # pyproject.toml is the one version source
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BACKENDS", "BackendUnavailableError", "available_backends", "default_backend", "set_default_backend", "cpu_isa",
    "mark_validated", "validation_enabled", "set_validation",
    "token_entropy", "linear_entropy",
    "entropy_patch_lengths", "lengths_to_cu_seqlens", "patch_ids", "cu_seqlens_from_position_ids",
    "patch_gather", "patch_scatter",
    "varlen_attention", "attended_pairs", "kvcache_attention", "linear",
    "VarlenAttention", "PatchGather", "PatchScatter", "Linear",
]
