"""The DPAR model layer; nothing here imports the pipeline. Files in the order of the paper's figure:

- ``entropy_model``: the small unconditional AR model whose next-token entropy H_i decides patch boundaries;
- ``patcher``: entropies -> packed patches (``PatchBatch``: token / patch offsets of a whole batch);
- ``dpar_model``: ``DPAR`` = local encoder -> patch embedding (max-pool + cross-attention refiner) -> global
  transformer over [class] + patches -> local decoder conditioned on its patch's global state -> vocabulary head;
- ``baseline``: ``LlamaGenBaseline``, the same blocks with one-token patches;
- building blocks: ``config`` (B / L / XL / tiny presets), ``blocks`` (RMSNorm, SwiGLU, packed attention, RoPE),
  ``conditioning`` (class embedding), ``kv_cache``;
- sampling: ``generation`` (KV-cache decoding), ``dpar_sampler`` (DPAR's image slots, each at its own token) and
  ``schedule`` (when its global step runs: lockstep or out of step), ``sampling`` (CFG, top-k / top-p),
  ``full_recompute`` (the slow reference the tests compare against); ``flops`` (analytic training FLOPs).
"""
from . import flops
from .baseline import LlamaGenBaseline
from .config import EntropyConfig, ModelConfig, get_config
from .dpar_model import DPAR
from .entropy_model import EntropyModel
from .patcher import PatchBatch, Patcher

__all__ = ["DPAR", "EntropyConfig", "EntropyModel", "LlamaGenBaseline", "ModelConfig", "PatchBatch", "Patcher",
           "flops", "get_config"]
