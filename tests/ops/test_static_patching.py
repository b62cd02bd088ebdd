"""static_patch_lengths: the content-independent patches of the ablation's static-patch baseline."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpar.model.patcher import PatchBatch
from dpar_kernels.patching import static_patch_lengths


def loop_static_lengths(height, width, patches):
    """The rule one row at a time, in plain Python: row r holds floor((r+1)P/H) - floor(rP/H) patches of
    widths floor((j+1)W/n) - floor(jW/n)."""
    lengths = []
    for row in range(height):
        count = (row + 1) * patches // height - row * patches // height
        lengths += [(j + 1) * width // count - j * width // count for j in range(count)]
    return lengths


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 3), st.data())
def test_matches_loop_and_respects_rows(height, width, images, data):
    patches = data.draw(st.integers(height, height * width))
    lengths, cu = static_patch_lengths(images, grid_height=height, grid_width=width, patches_per_image=patches)
    assert lengths.dtype == cu.dtype == torch.int32
    assert lengths.tolist() == loop_static_lengths(height, width, patches) * images
    assert cu.tolist() == [patches * b for b in range(images + 1)]
    if images:
        batch = PatchBatch.from_lengths(lengths, cu, width)  # raises if a patch crossed a row
        assert batch.tokens_per_image == height * width
        per_row = torch.bincount(batch.positions[:patches, 0], minlength=height)
        assert int(per_row.max()) - int(per_row.min()) <= 1  # rows share the patches evenly


def test_known_layouts():
    ones, _ = static_patch_lengths(1, grid_height=2, grid_width=4, patches_per_image=8)
    pairs, _ = static_patch_lengths(1, grid_height=2, grid_width=4, patches_per_image=4)
    rows, _ = static_patch_lengths(1, grid_height=2, grid_width=4, patches_per_image=2)
    mixed, _ = static_patch_lengths(1, grid_height=2, grid_width=4, patches_per_image=5)
    assert ones.tolist() == [1] * 8 and pairs.tolist() == [2] * 4 and rows.tolist() == [4, 4]
    assert mixed.tolist() == [2, 2, 1, 1, 2]  # rows of 2 and 3 patches
    paper, _ = static_patch_lengths(1, grid_height=16, grid_width=16, patches_per_image=142)  # 1.8x reduction
    assert paper.numel() == 142 and set(paper.tolist()) == {1, 2}


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(patches_per_image=1), ValueError, "patches_per_image"),
    (dict(patches_per_image=9), ValueError, "patches_per_image"),
    (dict(patches_per_image=4.0), TypeError, "patches_per_image"),
    (dict(grid_width=0), ValueError, "grid_width"),
    (dict(num_images=-1), ValueError, "num_images"),
])
def test_bad_inputs_name_the_argument(kwargs, error, name):
    args = dict(num_images=2, grid_height=2, grid_width=4, patches_per_image=4)
    args.update(kwargs)
    num_images = args.pop("num_images")
    with pytest.raises(error, match=name):
        static_patch_lengths(num_images, **args)
