"""Configs: names, overrides, validation and LlamaGen-matched sizes."""
from dataclasses import replace

import pytest
import torch
from model_utils import random_batch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dpar
from dpar.model import flops
from dpar.model.blocks import AxialRope
from dpar.model.config import AUTHORS_CHOICES

LLAMAGEN_PARAMS = {"B": 111e6, "L": 343e6, "XL": 775e6}  # LlamaGen GPT-B/L/XL parameter counts (paper table)


def test_named_configs_and_overrides():
    tiny = dpar.get_config("tiny")
    sizes = (tiny.width, tiny.num_heads, tiny.encoder_layers, tiny.global_layers, tiny.decoder_layers)
    assert sizes == (64, 4, 1, 2, 1)
    layers = {name: (c.encoder_layers, c.global_layers, c.decoder_layers, c.width)
              for name, c in ((n, dpar.get_config(n)) for n in ("B", "L", "XL"))}
    assert layers == {"B": (1, 8, 3, 768), "L": (1, 19, 4, 1024), "XL": (1, 30, 5, 1280)}
    assert dpar.get_config("B", grid_height=24, grid_width=24).tokens_per_image == 576
    assert isinstance(dpar.get_config("entropy"), dpar.EntropyConfig)
    with pytest.raises(ValueError, match="unknown config"):
        dpar.get_config("huge")
    with pytest.raises(TypeError, match="override"):
        dpar.get_config("tiny", depth=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        dpar.get_config("tiny", num_kv_heads=3)


@pytest.mark.parametrize("name", ["B", "L", "XL"])
def test_baseline_sizes_match_llamagen(name):
    with torch.device("meta"):
        baseline = dpar.LlamaGenBaseline(dpar.get_config(name))
        model = dpar.DPAR(dpar.get_config(name))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(baseline) - LLAMAGEN_PARAMS[name]) < 0.02 * LLAMAGEN_PARAMS[name]
    assert count(baseline) < count(model) < 1.15 * count(baseline)  # patch embedding + decoder conditions


def test_authors_choices_validate_and_build():
    config = dpar.get_config("tiny", **AUTHORS_CHOICES)
    assert (config.token_dropout, config.resid_dropout, config.ffn_dropout) == (0.1, 0.1, 0.1)
    assert config.zero_init_head is True and config.refiner_mlp is False and config.patch_rope_split == "half_row"
    assert dpar.get_config("tiny", refiner_mlp=0).refiner_mlp is False  # --override strings give ints
    for bad in (dict(token_dropout=1.0), dict(ffn_dropout=-0.1), dict(patch_rope_split="quarters"),
                dict(zero_init_head=2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dpar.get_config("tiny", **bad)


def test_patch_rope_split_gives_the_row_half_of_the_pairs():
    config = dpar.get_config("tiny", num_heads=2, num_kv_heads=2)  # head_dim 32: 16 rotary pairs
    assert dpar.DPAR(config).patch_rope.sizes == [6, 5, 5]
    assert dpar.DPAR(replace(config, patch_rope_split="half_row")).patch_rope.sizes == [8, 4, 4]
    assert AxialRope(head_dim=14, axes=3, shares=(2, 1, 1)).sizes == [4, 2, 1]  # remainder to the first axes
    with pytest.raises(ValueError, match="shares"):
        AxialRope(head_dim=16, axes=3, shares=(1, 1))


def test_refiner_without_mlp_has_no_mlp_and_flops_follow():
    config = dpar.get_config("tiny", refiner_mlp=False)
    torch.manual_seed(0)
    model = dpar.DPAR(config).double()
    assert model.refiner.mlp is None and not any("refiner.mlp" in n for n, _ in model.named_parameters())
    tokens, labels, patches, _ = random_batch(config, images=2, max_len=3, seed=1)
    with FlopCounterMode(display=False) as counter:
        model.loss(tokens, labels, patches).backward()
    expected = flops.dpar_training_flops(config, patches)["total"]
    assert abs(expected - counter.get_total_flops()) <= 0.02 * counter.get_total_flops()
    with_mlp = flops.dpar_training_flops(replace(config, refiner_mlp=True), patches)["total"]
    assert with_mlp > expected


@pytest.mark.parametrize("kind", ["dpar", "baseline"])
def test_zero_head_starts_uniform_and_dropout_only_trains(kind):
    config = dpar.get_config("tiny", class_dropout=0.0, **AUTHORS_CHOICES)  # only the new dropouts act
    torch.manual_seed(0)
    model = (dpar.DPAR if kind == "dpar" else dpar.LlamaGenBaseline)(config).double()
    tokens, labels, patches, _ = random_batch(config, images=2, max_len=3, seed=2)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, labels, patches)
        assert torch.equal(logits, torch.zeros_like(logits))  # zero head: uniform predictions, loss log V
        nn.init.normal_(model.head.weight, std=0.02)
        first, second = model(tokens, labels, patches), model(tokens, labels, patches)
        assert torch.equal(first, second), "dropout must be off in eval mode"
        model.train()
        torch.manual_seed(1)
        dropped = model(tokens, labels, patches)
    assert not torch.allclose(dropped, first), "token / residual / FFN dropout must act in training"
