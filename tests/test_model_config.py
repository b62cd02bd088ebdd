"""Configs: names, overrides, validation and LlamaGen-matched sizes."""
import pytest
import torch

import dpar

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
