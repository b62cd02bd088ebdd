"""The analytic FLOP model agrees with torch.utils.flop_counter on a real forward + backward."""
import pytest
import torch
from model_utils import patch_batch, random_batch, single_thread, tiny_models  # noqa: F401
from torch.utils.flop_counter import FlopCounterMode

import dpar
from dpar import flops


def _counted(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [{}, dict(num_kv_heads=2, decoder_layers=2, encoder_layers=2)],
                         ids=["tiny", "tiny-gqa"])
@pytest.mark.parametrize("max_len", [1, 3, 4])
def test_flop_model_matches_flop_counter(overrides, max_len):
    config, model, baseline, _ = tiny_models(torch.float32, **overrides)
    tokens, labels, patches, _ = random_batch(config, images=3, max_len=max_len, seed=max_len)
    model.train()
    expected = flops.dpar_training_flops(config, patches)
    measured = _counted(lambda: model.loss(tokens, labels, patches).backward())
    assert abs(expected["total"] - measured) <= 0.02 * measured, (expected, measured)
    expected_base = flops.baseline_training_flops(config, batch_size=3)
    measured_base = _counted(lambda: baseline.loss(tokens, labels).backward())
    assert abs(expected_base["total"] - measured_base) <= 0.02 * measured_base, (expected_base, measured_base)
    # forward alone
    with torch.no_grad():
        measured_forward = _counted(lambda: model(tokens, labels, patches))
    assert abs(expected["forward"] - measured_forward) <= 0.02 * measured_forward


def test_flop_breakdown_is_consistent():
    config = dpar.get_config("B")
    one_token = patch_batch([[1] * config.tokens_per_image] * 2, config.grid_width)
    big = patch_batch([[4] * (config.tokens_per_image // 4)] * 2, config.grid_width)
    small, large = flops.dpar_training_flops(config, big), flops.dpar_training_flops(config, one_token)
    for result in (small, large):
        parts = sum(v for k, v in result.items() if k not in ("forward", "backward", "total", "global_tokens"))
        assert parts == result["total"] == result["forward"] + result["backward"]
    assert small["global_tokens"] == 2 * (config.tokens_per_image // 4 + 1)
    assert large["global_tokens"] == 2 * (config.tokens_per_image + 1)
    assert small["total"] < large["total"]
    base = flops.baseline_training_flops(config, batch_size=2)
    assert small["total"] < base["total"], "4-token patches must save FLOPs against the baseline"
    assert base["total"] > 0 and base["forward"] * 2 < base["backward"] < base["forward"] * 3


def test_every_model_has_one_loss_flops_and_generate_signature():
    config, model, baseline, entropy_model = tiny_models(torch.float32, class_dropout=0.0)
    tokens, labels, patches, _ = random_batch(config, images=3, max_len=3, seed=3)
    torch.manual_seed(0)
    assert torch.equal(entropy_model.loss(tokens, labels, patches), entropy_model.loss(tokens))
    assert torch.equal(baseline.loss(tokens, labels, patches), baseline.loss(tokens, labels))
    with pytest.raises(ValueError, match="patches"):
        model.loss(tokens, labels)
    with pytest.raises(ValueError, match="labels"):
        baseline.loss(tokens)
    assert model.training_flops(tokens, patches) == flops.dpar_training_flops(config, patches)["total"]
    assert baseline.training_flops(tokens) == flops.baseline_training_flops(config, batch_size=3)["total"]
    measured = _counted(lambda: entropy_model.loss(tokens).backward())
    assert entropy_model.training_flops(tokens, patches) == measured > 0
    # generate: the baseline takes (and ignores) DPAR's patch arguments; DPAR names the ones it misses
    plain = baseline.generate([1, 2], generator=torch.Generator().manual_seed(0))
    tokens_and_none = baseline.generate([1, 2], entropy_model=entropy_model, threshold=1.0, max_patch_size=4,
                                        generator=torch.Generator().manual_seed(0), return_patches=True)
    assert torch.equal(tokens_and_none[0], plain) and tokens_and_none[1] is None
    with pytest.raises(ValueError, match="entropy_model, threshold and max_patch_size"):
        model.generate([1, 2], threshold=1.0, max_patch_size=4)
