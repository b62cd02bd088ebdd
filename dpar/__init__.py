"""DPAR model layer: entropy model, patcher, DPAR, the LlamaGen baseline, generation and FLOP accounting."""
from . import flops
from .baseline import LlamaGenBaseline
from .config import EntropyConfig, ModelConfig, get_config
from .entropy_model import EntropyModel
from .model import DPAR
from .patcher import PatchBatch, Patcher

__all__ = ["EntropyModel", "DPAR", "LlamaGenBaseline", "Patcher", "PatchBatch", "ModelConfig", "EntropyConfig",
           "get_config", "flops"]
