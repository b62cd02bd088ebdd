"""Next-token sampling (dpar/model/sampling.py): the inverse-CDF draw follows the filtered softmax distribution."""
import math

import pytest
import torch

from dpar.model.sampling import filter_logits, sample_logits, sampling_noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_draws_follow_the_softmax_distribution(dtype):
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.5]).to(dtype)
    rows = 40000
    generator = torch.Generator().manual_seed(1)
    tokens = sample_logits(logits.expand(rows, -1), temperature=0.8, generator=generator)
    expected = torch.softmax(logits.double() / 0.8, -1)
    counts = torch.bincount(tokens, minlength=5).double()
    sigma = (rows * expected * (1 - expected)).sqrt()
    assert ((counts - rows * expected).abs() <= 5 * sigma).all(), (counts / rows, expected)


def test_tokens_of_probability_zero_are_never_drawn():
    logits = torch.tensor([-math.inf, 1.0, -math.inf, 0.5, 3.0, -math.inf])
    generator = torch.Generator().manual_seed(0)
    tokens = sample_logits(logits.expand(20000, -1), generator=generator)
    assert set(tokens.tolist()) == {1, 3, 4}
    filtered = sample_logits(logits.expand(20000, -1), top_k=2, generator=generator)
    assert set(filtered.tolist()) == {1, 4}
    nucleus = sample_logits(logits.expand(20000, -1), top_p=0.5, generator=generator)
    assert set(nucleus.tolist()) == {4}
    assert torch.isinf(filter_logits(logits[None], top_k=2)[0, 3])


def test_the_extreme_uniforms_pick_the_first_and_last_possible_tokens():
    logits = torch.tensor([[-math.inf, 0.0, 1.0, -math.inf]] * 2)
    noise = torch.tensor([[1e-30], [1.0]])
    assert sample_logits(logits, noise=noise).tolist() == [1, 2]


def test_noise_is_drawn_from_the_generator_and_greedy_needs_none():
    first = sampling_noise(4, temperature=1.0, dtype=torch.float32, device="cpu",
                           generator=torch.Generator().manual_seed(3))
    again = sampling_noise(4, temperature=1.0, dtype=torch.float32, device="cpu",
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and first.shape == (4, 1) and bool(((first > 0) & (first <= 1)).all())
    assert sampling_noise(4, temperature=0, dtype=torch.float32, device="cpu") is None
    logits = torch.randn(4, 9)
    assert torch.equal(sample_logits(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, noise=first), sample_logits(logits, noise=first.clone()))
