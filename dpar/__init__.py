"""DPAR: the model layer (``dpar.model``) and the pipeline (``dpar.pipeline``: data, tokenizers, checkpoints, the
``python -m dpar`` commands). The model's public names are re-exported here."""
from .model import (
    DPAR,
    EntropyConfig,
    EntropyModel,
    LlamaGenBaseline,
    ModelConfig,
    PatchBatch,
    Patcher,
    flops,
    get_config,
)

__all__ = ["DPAR", "EntropyConfig", "EntropyModel", "LlamaGenBaseline", "ModelConfig", "PatchBatch", "Patcher",
           "flops", "get_config"]
