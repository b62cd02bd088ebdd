"""entropy_patch_lengths, lengths_to_cu_seqlens and patch_ids against a plain-Python statement of the DPAR rule."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpar_kernels as dk

# Entropies and thresholds are drawn from halves so that ties (H == threshold: no cut) happen often and every
# value is exact in fp16/bf16/fp32/fp64.
HALVES = [k / 2 for k in range(0, 21)]
ENTROPY_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def loop_patch_lengths(entropy_rows, thresholds, max_patch_size, row_width):
    """The DPAR rule, one token at a time: token i starts a patch when i == 0, when H_{i-1} > threshold, when
    i is a multiple of row_width, or when the running patch already holds max_patch_size tokens.
    Returns (flat list of lengths, list of patch counts per image)."""
    lengths, counts = [], []
    for row, threshold in zip(entropy_rows, thresholds):
        image = []
        for i in range(len(row)):
            new_row = row_width is not None and i % row_width == 0
            if i == 0 or row[i - 1] > threshold or new_row or image[-1] == max_patch_size:
                image.append(0)
            image[-1] += 1
        lengths += image
        counts.append(len(image))
    return lengths, counts


@st.composite
def patch_problems(draw):
    batch = draw(st.integers(0, 4))
    tokens = draw(st.integers(0, 40))
    entropy = draw(st.lists(st.lists(st.sampled_from(HALVES), min_size=tokens, max_size=tokens),
                            min_size=batch, max_size=batch))
    dtype = draw(st.sampled_from(ENTROPY_DTYPES))
    threshold_values = st.sampled_from(HALVES + [math.inf, -math.inf])
    per_image = draw(st.booleans())
    if per_image:
        threshold = draw(st.lists(threshold_values, min_size=batch, max_size=batch))
    else:
        threshold = draw(threshold_values)
    max_patch_size = draw(st.integers(1, 6))
    row_width = draw(st.one_of(st.none(), st.integers(1, 13)))  # includes widths that do not divide T
    return batch, tokens, entropy, dtype, threshold, per_image, max_patch_size, row_width


@settings(max_examples=300, deadline=None)
@given(patch_problems())
def test_matches_plain_loop_and_invariants(problem):
    batch, tokens, entropy, dtype, threshold, per_image, max_patch_size, row_width = problem
    entropy_tensor = torch.tensor(entropy, dtype=dtype).reshape(batch, tokens)
    thresholds = threshold if per_image else [threshold] * batch
    threshold_arg = torch.tensor(threshold, dtype=torch.float32) if per_image else threshold

    lengths, cu_patches = dk.entropy_patch_lengths(entropy_tensor, threshold=threshold_arg,
                                                   max_patch_size=max_patch_size, row_width=row_width)

    expected_lengths, expected_counts = loop_patch_lengths(entropy, thresholds, max_patch_size, row_width)
    assert lengths.dtype == torch.int32 and cu_patches.dtype == torch.int32
    assert lengths.tolist() == expected_lengths
    assert cu_patches.tolist() == [0] + torch.tensor(expected_counts, dtype=torch.int64).cumsum(0).tolist()
    # invariants, stated independently of the loop
    assert int(lengths.sum()) == batch * tokens
    for b in range(batch):
        image = lengths[cu_patches[b]:cu_patches[b + 1]]
        assert int(image.sum()) == tokens
        assert bool((image >= 1).all()) and bool((image <= max_patch_size).all())
        if row_width is not None:
            ends = image.long().cumsum(0) - 1
            starts = ends - image.long() + 1
            assert torch.equal(starts // row_width, ends // row_width), "a patch crosses a row"


@pytest.mark.parametrize("max_patch_size,row_width,expected", [
    (4, None, [4, 4, 2]),
    (3, 4, [3, 1, 3, 1, 2]),
    (2, 5, [2, 2, 1, 2, 2, 1]),
    (10, None, [10]),
])
def test_infinite_threshold_cuts_only_by_max_size_and_rows(max_patch_size, row_width, expected):
    tokens = sum(expected)
    entropy = torch.rand(2, tokens) * 10
    lengths, cu = dk.entropy_patch_lengths(entropy, threshold=math.inf, max_patch_size=max_patch_size,
                                           row_width=row_width)
    assert lengths.tolist() == expected * 2
    assert cu.tolist() == [0, len(expected), 2 * len(expected)]


def test_minus_infinite_threshold_gives_singletons():
    entropy = torch.rand(3, 17) * 10
    lengths, cu = dk.entropy_patch_lengths(entropy, threshold=-math.inf, max_patch_size=4, row_width=5)
    assert lengths.tolist() == [1] * 51
    assert cu.tolist() == [0, 17, 34, 51]


def test_per_image_threshold():
    entropy = torch.tensor([[1.0, 5.0, 1.0, 5.0, 1.0]] * 2)
    lengths, cu = dk.entropy_patch_lengths(entropy, threshold=torch.tensor([0.5, 3.0]), max_patch_size=8)
    # image 0: every H > 0.5, all singletons; image 1: cuts after the 5.0s (tokens 2 and 4 start patches)
    assert lengths.tolist() == [1, 1, 1, 1, 1, 2, 2, 1]
    assert cu.tolist() == [0, 5, 8]


def test_paper_setting_cuts_rows():
    entropy = torch.full((1, 32), 1.0)  # low entropy everywhere: patches of max size 4, rows of 16
    lengths, _ = dk.entropy_patch_lengths(entropy, threshold=7.8, max_patch_size=4, row_width=16)
    assert lengths.tolist() == [4] * 8


@pytest.mark.parametrize("batch,tokens", [(0, 5), (3, 0), (0, 0)])
def test_empty_shapes(batch, tokens):
    lengths, cu = dk.entropy_patch_lengths(torch.rand(batch, tokens), threshold=1.0, max_patch_size=4,
                                           row_width=4)
    assert lengths.dtype == torch.int32 and lengths.numel() == 0
    assert cu.dtype == torch.int32 and cu.tolist() == [0] * (batch + 1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=0, max_size=30))
def test_cu_seqlens_and_patch_ids_round_trip(lengths_list):
    lengths = torch.tensor(lengths_list, dtype=torch.int64)
    cu = dk.lengths_to_cu_seqlens(lengths)
    assert cu.dtype == torch.int32 and cu.shape == (len(lengths_list) + 1,)
    assert cu[0] == 0 and torch.equal((cu[1:] - cu[:-1]).long(), lengths)
    total = int(cu[-1])
    ids = dk.patch_ids(lengths.to(torch.int32), total)
    assert ids.dtype == torch.int32 and ids.shape == (total,)
    assert torch.equal(torch.bincount(ids.long(), minlength=len(lengths_list)), lengths)
    for p in range(len(lengths_list)):
        assert bool((ids[cu[p]:cu[p + 1]] == p).all())


def test_patch_lengths_feed_patch_ids():
    entropy = torch.rand(4, 24) * 10
    lengths, cu_patches = dk.entropy_patch_lengths(entropy, threshold=6.0, max_patch_size=4, row_width=8)
    ids = dk.patch_ids(lengths, 4 * 24)
    assert int(ids[-1]) == lengths.numel() - 1
    cu_tokens = dk.lengths_to_cu_seqlens(lengths)
    assert int(cu_tokens[-1]) == 4 * 24
    assert torch.equal(cu_tokens[cu_patches.long()], torch.arange(5, dtype=torch.int32) * 24)  # images align


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(entropy=torch.ones(2, 4, dtype=torch.int64)), TypeError, "entropy"),
    (dict(entropy=torch.rand(8)), ValueError, "entropy"),
    (dict(entropy=[[1.0, 2.0]]), TypeError, "entropy"),
    (dict(threshold=torch.ones(3)), ValueError, "threshold"),
    (dict(threshold=torch.ones(2, 1)), ValueError, "threshold"),
    (dict(threshold=torch.ones(2, dtype=torch.int32)), TypeError, "threshold"),
    (dict(threshold="7.8"), TypeError, "threshold"),
    (dict(threshold=None), TypeError, "threshold"),
    (dict(max_patch_size=0), ValueError, "max_patch_size"),
    (dict(max_patch_size=2.0), TypeError, "max_patch_size"),
    (dict(max_patch_size=True), TypeError, "max_patch_size"),
    (dict(row_width=0), ValueError, "row_width"),
    (dict(row_width=4.0), TypeError, "row_width"),
])
def test_bad_inputs_name_the_argument(kwargs, error, name):
    args = dict(entropy=torch.rand(2, 8), threshold=1.0, max_patch_size=4, row_width=None)
    args.update(kwargs)
    entropy = args.pop("entropy")
    with pytest.raises(error, match=name):
        dk.entropy_patch_lengths(entropy, **args)


@pytest.mark.parametrize("call,error,name", [
    (lambda: dk.lengths_to_cu_seqlens(torch.ones(3)), TypeError, "lengths"),
    (lambda: dk.lengths_to_cu_seqlens(torch.ones(2, 2, dtype=torch.int32)), ValueError, "lengths"),
    (lambda: dk.lengths_to_cu_seqlens(torch.tensor([1, -1])), ValueError, "lengths"),
    (lambda: dk.patch_ids(torch.ones(3), 3), TypeError, "patch_lengths"),
    (lambda: dk.patch_ids(torch.tensor([2, -1], dtype=torch.int32), 1), ValueError, "patch_lengths"),
    (lambda: dk.patch_ids(torch.tensor([2, 2], dtype=torch.int32), 5), ValueError, "total"),
    (lambda: dk.patch_ids(torch.tensor([2, 2], dtype=torch.int32), -1), ValueError, "total"),
])
def test_offset_helpers_reject_bad_inputs(call, error, name):
    with pytest.raises(error, match=name):
        call()


@pytest.mark.parametrize("row_width", [None, 5])
def test_next_patch_starts_with_each_image_at_its_own_token_follows_patch_starts(row_width):
    """The sampler's per-token rule with per-image positions (images staggered by one token each) marks the same
    patch starts as the batch rule over whole rows."""
    from dpar_kernels.patching.boundaries import next_patch_starts, patch_starts

    generator = torch.Generator().manual_seed(0)
    batch, tokens, max_patch = 4, 13, 3
    entropy = torch.tensor(HALVES)[torch.randint(len(HALVES), (batch, tokens), generator=generator)]
    threshold = torch.tensor([2.0, 4.5, 0.0, math.inf], dtype=torch.float64)
    expected = patch_starts(entropy, threshold, max_patch, row_width)
    found = torch.zeros(batch, tokens, dtype=torch.bool)
    open_start = torch.zeros(batch, dtype=torch.long)
    for step in range(tokens + batch):
        position = (step - torch.arange(batch)).clamp(0, tokens - 1)  # image b is b tokens behind
        live = (step - torch.arange(batch) >= 0) & (step - torch.arange(batch) < tokens)
        previous = entropy.gather(1, (position - 1).clamp(min=0)[:, None])[:, 0]
        starts = next_patch_starts(position, previous, threshold, open_start, max_patch, row_width) & live
        open_start = torch.where(starts, position, open_start)
        found[live, position[live]] = starts[live]
    assert torch.equal(found, expected)
