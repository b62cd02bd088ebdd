"""Tiny models learn: they overfit a handful of token grids, and every parameter gets a gradient."""
import math

import pytest
import torch
from model_utils import random_batch, single_thread, tiny_models  # noqa: F401


def _overfit(model, step_loss, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    first = None
    for _ in range(steps):
        loss = step_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    return first, loss.item()


@pytest.mark.parametrize("name", ["dpar", "baseline", "entropy"])
def test_tiny_model_overfits_a_few_grids(name):
    config, dpar_model, baseline, entropy_model = tiny_models(torch.float32, class_dropout=0.0)
    tokens, labels, patches, _ = random_batch(config, images=4, max_len=4, seed=6)
    losses = {"dpar": lambda: dpar_model.loss(tokens, labels, patches),
              "baseline": lambda: baseline.loss(tokens, labels),
              "entropy": lambda: entropy_model.loss(tokens)}
    model = {"dpar": dpar_model, "baseline": baseline, "entropy": entropy_model}[name]
    first, last = _overfit(model, losses[name], steps=100)
    chance = math.log(config.vocab_size)
    assert abs(first - chance) < 0.5, f"initial loss {first:.3f} should be near ln V = {chance:.3f}"
    assert last < 0.25 * chance, f"{name} did not overfit: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", ["dpar", "baseline"])
def test_every_parameter_gets_a_gradient(name):
    config, dpar_model, baseline, _ = tiny_models(torch.float64)
    model = dpar_model if name == "dpar" else baseline
    tokens, labels, patches, _ = random_batch(config, images=2, seed=7)
    model.train()
    model.loss(tokens, labels, patches).backward()
    for param_name, param in model.named_parameters():
        if param_name == "class_embed.embed.weight":  # only the rows of the labels used (and maybe null)
            assert param.grad[labels].abs().sum(1).gt(0).all()
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{param_name} gets no gradient"
        assert torch.isfinite(param.grad).all(), param_name


def test_label_dropout_only_in_training():
    config, model, _, _ = tiny_models(torch.float64, class_dropout=0.5)
    tokens, labels, patches, _ = random_batch(config, images=8, seed=8)
    with torch.no_grad():
        assert torch.equal(model(tokens, labels, patches), model(tokens, labels, patches))  # eval: no dropout
        null = model(tokens, torch.full_like(labels, config.num_classes), patches)
        model.train()
        torch.manual_seed(1)
        dropped = model(tokens, labels, patches)
    rows = dropped.view(8, config.tokens_per_image, -1)
    null_rows = null.view(8, config.tokens_per_image, -1)
    is_null = [torch.allclose(rows[b], null_rows[b]) for b in range(8)]
    assert 0 < sum(is_null) < 8, "about half of the labels should be replaced by the null class"


def test_forward_rejects_bad_inputs():
    config, model, baseline, _ = tiny_models()
    tokens, labels, patches, _ = random_batch(config, images=2, seed=9)
    with pytest.raises(TypeError, match="tokens"):
        model(tokens.int(), labels, patches)
    with pytest.raises(TypeError, match="labels"):
        baseline(tokens, labels[:1])
    with pytest.raises(ValueError, match="tokens must be in"):
        baseline(tokens + config.vocab_size, labels)
    with pytest.raises(ValueError, match="patches describe"):
        model(tokens[:1], labels[:1], patches)
    with pytest.raises(ValueError, match="labels must be in"):
        model(tokens, labels + config.num_classes + 1, patches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_losses_track_float32(dtype):
    config, dpar_model, baseline, entropy_model = tiny_models(torch.float32)
    tokens, labels, patches, _ = random_batch(config, images=2, seed=10)
    with torch.no_grad():
        for model, args in ((dpar_model, (tokens, labels, patches)), (baseline, (tokens, labels)),
                            (entropy_model, (tokens,))):
            full = model.loss(*args)
            half = model.to(dtype).loss(*args)
            assert half.dtype == torch.float32 and torch.isfinite(half)
            assert abs(half.item() - full.item()) < 2e-2 * full.item(), (type(model).__name__, half, full)
        entropies = entropy_model.entropies(tokens)
        assert entropies.dtype == torch.float32 and torch.isfinite(entropies).all()
