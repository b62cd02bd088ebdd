"""The one config -> model path of the pipeline: a config sized to a dataset (plus --override), a model from a config,
a model from a checkpoint."""
from __future__ import annotations

import dataclasses

import torch

KINDS = ("entropy", "dpar", "baseline")
ENTROPY_SIZES = {"tiny": "entropy-tiny"}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _parse_overrides(items: list[str] | None) -> dict:
    """["width=128", "class_dropout=0.1"] -> {"width": 128, "class_dropout": 0.1} (ints, floats, else strings)."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        for cast in (int, float):
            try:
                overrides[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            overrides[key] = value
    return overrides


def make_config(kind: str, size: str, dataset, overrides: list[str] | None = None) -> dict:
    """The config (as a plain dict) of a ``kind`` model of preset ``size`` fitted to ``dataset``'s vocabulary, classes
    and grid, with ``overrides`` ("key=value" strings, as --override takes) applied last."""
    from ..model.config import get_config

    _check_kind(kind)
    fields = dict(vocab_size=dataset.vocab_size, grid_height=dataset.grid_height, grid_width=dataset.grid_width,
                  **_parse_overrides(overrides))
    if kind == "entropy":
        config = get_config(ENTROPY_SIZES.get(size, size), **fields)
    else:
        config = get_config(size, num_classes=dataset.num_classes, **fields)
    return dataclasses.asdict(config)


def build_model(kind: str, config: dict) -> torch.nn.Module:
    """A freshly initialised model of ``kind`` from a config dict (as make_config returns)."""
    from ..model.config import EntropyConfig, ModelConfig

    _check_kind(kind)
    if kind == "entropy":
        from ..model.entropy_model import EntropyModel
        return EntropyModel(EntropyConfig(**config))
    if kind == "dpar":
        from ..model.dpar_model import DPAR
        return DPAR(ModelConfig(**config))
    from ..model.baseline import LlamaGenBaseline
    return LlamaGenBaseline(ModelConfig(**config))


def load_model(path: str, kind: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on ``device``, checkpoint info) from a checkpoint written by ``dpar train``."""
    from .checkpoint import checkpoint_info, load_checkpoint

    info = checkpoint_info(path)
    if info["kind"] != kind:
        raise ValueError(f"checkpoint {path} holds a {info['kind']!r} model, expected {kind!r}")
    model = build_model(kind, info["config"])
    load_checkpoint(path, model, kind=kind)
    return model.to(device).eval(), info
