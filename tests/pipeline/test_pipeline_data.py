import json

import numpy as np
import pytest
import torch

from dpar.pipeline.data import (
    OFFLINE_PHOTOS,
    Region,
    TokenGridDataset,
    boxes_overlap,
    leak_free_crops,
    load_offline_photos,
    region_crops,
    split_regions,
    write_token_dataset,
)
from dpar.pipeline.tokenizer import PaletteTokenizer, fit_palette


def _write(root, stem, codes, label):
    (root / "codes").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    np.save(root / "codes" / f"{stem}.npy", codes)
    np.save(root / "labels" / f"{stem}.npy", np.array([label]))


@pytest.mark.parametrize("layout", ["flat", "leading1", "grid", "leading1_grid"])
def test_loader_reads_single_variant_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 50, (3, 3)).astype(np.int32) for _ in range(3)]
    shape = {"flat": (9,), "leading1": (1, 9), "grid": (3, 3), "leading1_grid": (1, 3, 3)}[layout]
    for i, grid in enumerate(grids):
        _write(tmp_path, i, grid.reshape(shape), label=i % 2)
    dataset = TokenGridDataset(str(tmp_path))
    assert (len(dataset), dataset.grid_height, dataset.grid_width) == (3, 3, 3)
    assert dataset.vocab_size == max(int(g.max()) for g in grids) + 1 and dataset.num_classes == 2
    for i, grid in enumerate(grids):
        codes, label = dataset[i]
        assert codes.dtype == torch.int64 and torch.equal(codes, torch.from_numpy(grid.reshape(-1)).long())
        assert int(label) == i % 2


def test_loader_ten_crop_axis_and_rectangular_grid_from_meta(tmp_path):
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 7, (2, 1, 10, 6)).astype(np.int64)  # [1, A=10, T=6] per image, grid 2x3
    for i in range(2):
        _write(tmp_path, i, crops[i], label=i)
    (tmp_path / "meta.json").write_text(json.dumps({"grid_height": 2, "grid_width": 3, "vocab_size": 7,
                                                    "num_classes": 2}))
    dataset = TokenGridDataset(str(tmp_path))
    assert (len(dataset), dataset.variants, dataset.grid_height, dataset.grid_width) == (20, 10, 2, 3)
    assert torch.equal(dataset[13][0], torch.from_numpy(crops[1, 0, 3]))
    assert int(dataset[13][1]) == 1


def test_batch_reads_items_from_disk_or_memory_alike(tmp_path):
    """batch() equals the items stacked, before and after preload; preload respects its size limit and checks
    every item (a bad code fails it, as reading the item would)."""
    codes, labels = torch.randint(0, 300, (12, 2, 5)), torch.randint(0, 3, (12,))
    write_token_dataset(str(tmp_path), codes, labels, vocab_size=300, num_classes=3)
    dataset = TokenGridDataset(str(tmp_path))
    indices = torch.tensor([11, 0, 5, 5])
    from_disk = dataset.batch(indices)
    assert torch.equal(from_disk[0], codes.reshape(12, 10)[indices]) and torch.equal(from_disk[1], labels[indices])
    assert not dataset.preload(max_bytes=12 * 10 * 8 - 1)  # too large for the limit: stays on disk
    assert dataset.preload(max_bytes=12 * 10 * 8)
    np.save(tmp_path / "codes" / "0.npy", np.zeros((1, 10), dtype=np.int16))  # memory is not re-read
    for got, expected in zip(dataset.batch(indices), from_disk):
        assert torch.equal(got, expected)
    np.save(tmp_path / "codes" / "3.npy", np.full((1, 10), 300, dtype=np.int16))
    with pytest.raises(ValueError, match="outside"):
        TokenGridDataset(str(tmp_path)).preload()


def test_loader_sorts_numerically_and_round_trips_writer(tmp_path):
    codes = torch.randint(0, 300, (12, 2, 5))
    labels = torch.randint(0, 3, (12,))
    write_token_dataset(str(tmp_path), codes, labels, vocab_size=300, num_classes=3)
    dataset = TokenGridDataset(str(tmp_path))
    assert dataset.stems[:3] == ["0", "1", "2"] and dataset.stems[-1] == "11"
    for i in range(12):
        assert torch.equal(dataset[i][0], codes[i].reshape(-1)) and int(dataset[i][1]) == int(labels[i])


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="codes/"):
        TokenGridDataset(str(tmp_path))
    _write(tmp_path, 0, np.zeros((1, 16), np.int32), 0)
    _write(tmp_path, 1, np.zeros((1, 9), np.int32), 0)
    dataset = TokenGridDataset(str(tmp_path), vocab_size=4, num_classes=1)
    with pytest.raises(ValueError, match="1.npy"):
        dataset[1]
    np.save(tmp_path / "codes" / "2.npy", np.full((1, 16), 9, np.int32))
    np.save(tmp_path / "labels" / "2.npy", np.array([0]))
    with pytest.raises(ValueError, match="outside"):
        TokenGridDataset(str(tmp_path), vocab_size=4, num_classes=1)[2]
    np.save(tmp_path / "codes" / "3.npy", np.zeros((1, 16), np.int32))
    with pytest.raises(ValueError, match="labels/3.npy"):
        TokenGridDataset(str(tmp_path))


def _two_items(root, labels=(0, 1), num_classes=2):
    for i, label in enumerate(labels):
        _write(root, i, np.zeros((1, 4), np.int32), label)
    (root / "meta.json").write_text(json.dumps({"grid_height": 2, "grid_width": 2, "vocab_size": 4,
                                                "num_classes": num_classes}))


def test_labels_must_be_integers_below_num_classes(tmp_path):
    _two_items(tmp_path, labels=(0, 2))  # 2 == num_classes: the null class
    with pytest.raises(ValueError, match=r"labels/1.npy holds class 2, outside \[0, 2\).*null class"):
        TokenGridDataset(str(tmp_path))[1]
    np.save(tmp_path / "labels" / "1.npy", np.array([-1]))
    with pytest.raises(ValueError, match="labels/1.npy holds class -1"):
        TokenGridDataset(str(tmp_path))[1]
    np.save(tmp_path / "labels" / "1.npy", np.array([1.7]))
    with pytest.raises(ValueError, match="labels/1.npy has dtype float64.*integers"):
        TokenGridDataset(str(tmp_path))[1]
    np.save(tmp_path / "labels" / "1.npy", np.array([1]))
    assert int(TokenGridDataset(str(tmp_path))[1][1]) == 1


@pytest.mark.parametrize("meta, match", [("{not json", "not readable JSON"), ("[1, 2]", "JSON object"),
                                         ('{"grid_height": "2"}', "grid_height must be an integer"),
                                         ('{"num_classes": 0}', "num_classes must be an integer >= 1")])
def test_bad_meta_json_names_the_file(tmp_path, meta, match):
    _two_items(tmp_path)
    (tmp_path / "meta.json").write_text(meta)
    with pytest.raises(ValueError, match=f"meta.json.*{match}"):
        TokenGridDataset(str(tmp_path))


@pytest.mark.parametrize("folder", ["codes", "labels"])
def test_truncated_npy_names_the_file(tmp_path, folder):
    _two_items(tmp_path)
    path = tmp_path / folder / "1.npy"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{folder}/1.npy is not a readable .npy file"):
        TokenGridDataset(str(tmp_path))[1]
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{folder}/1.npy is not a readable .npy file"):
        TokenGridDataset(str(tmp_path))[1]


def test_offline_photos_are_colour_and_grey_and_resized():
    photos = load_offline_photos(short_side=80)
    names = [name for name, _ in photos]
    assert len(photos) >= 15 and set(names) <= set(OFFLINE_PHOTOS) and len(set(names)) == len(names)
    for name, photo in photos:
        assert photo.dtype == torch.float32 and photo.shape[0] == 3 and min(photo.shape[1:]) == 80, name
        assert 0 <= float(photo.min()) and float(photo.max()) <= 1 and float(photo.std()) > 0.01, name
    grey = dict(photos)["camera"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    assert not torch.equal(dict(photos)["astronaut"][0], dict(photos)["astronaut"][1])


def test_boxes_overlap_is_exact_at_the_edges():
    boxes = torch.tensor([[0, 10, 10, 5]])  # photo 0, rows 10..14, columns 10..14
    others = torch.tensor([[0, 14, 14, 3],   # shares pixel (14, 14)
                           [0, 15, 10, 5],   # starts on the row below: touches, no shared pixel
                           [0, 10, 5, 5],    # ends on the column before
                           [1, 10, 10, 5],   # same rectangle of another photo
                           [0, 0, 0, 40]])   # contains it
    assert boxes_overlap(boxes, others).tolist() == [[True, False, False, False, True]]


def test_regions_tile_each_photo_and_every_photo_holds_regions_out():
    photos = load_offline_photos(short_side=80)
    train, heldout = split_regions(photos, 20, 0.25, seed=0)
    assert {r.photo for r in heldout} == {r.photo for r in train} == set(range(len(photos)))
    boxes = torch.tensor([[r.photo, r.top, r.left, r.size] for r in train + heldout])
    overlaps = boxes_overlap(boxes, boxes)
    assert torch.equal(overlaps, torch.eye(len(boxes), dtype=torch.bool)), "regions must be disjoint"
    assert 0.15 < len(heldout) / len(boxes) < 0.35
    with pytest.raises(ValueError, match="fewer than two regions"):
        split_regions(photos, 80, 0.25, seed=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_regions(photos, 20, 1.0, seed=0)


def test_no_heldout_crop_shares_a_pixel_with_a_training_crop():
    split = leak_free_crops(3000, 400, 8, seed=0)
    assert split.train_images.shape == (3000, 3, 8, 8) and split.heldout_images.shape == (400, 3, 8, 8)
    for boxes, labels in ((split.train_boxes, split.train_labels), (split.heldout_boxes, split.heldout_labels)):
        assert torch.equal(boxes[:, 0], labels) and bool((boxes[:, 3] >= 8).all() and (boxes[:, 3] <= 16).all())
    assert not bool(boxes_overlap(split.heldout_boxes, split.train_boxes).any())
    # the check can fail: training crops overlap each other (same regions), held-out ones the held-out ones
    assert bool(boxes_overlap(split.train_boxes[:500], split.train_boxes[500:]).any())
    photos = load_offline_photos(short_side=80)
    train_regions, heldout_regions = split_regions(photos, 20, 0.25, seed=0)
    for boxes, regions in ((split.train_boxes, train_regions), (split.heldout_boxes, heldout_regions)):
        inside = torch.zeros(len(boxes), dtype=torch.bool)
        for region in regions:
            inside |= ((boxes[:, 0] == region.photo) & (boxes[:, 1] >= region.top) & (boxes[:, 2] >= region.left)
                       & (boxes[:, 1] + boxes[:, 3] <= region.top + region.size)
                       & (boxes[:, 2] + boxes[:, 3] <= region.left + region.size))
        assert bool(inside.all()), "every crop lies inside one region of its own split"
    assert split.summary()["heldout_regions"] == len(heldout_regions)
    again = leak_free_crops(3000, 400, 8, seed=0)
    assert torch.equal(again.heldout_images, split.heldout_images) and torch.equal(again.train_boxes, split.train_boxes)


def test_a_crop_is_its_box_of_the_photo():
    photos = load_offline_photos(short_side=80)
    regions = [Region(photo=1, top=20, left=40, size=20)]
    images, labels, boxes = region_crops(photos, regions, 20, 8, 8, seed=5)  # side 8: no resize
    assert labels.tolist() == [1] * 20
    for image, (photo, top, left, side) in zip(images, boxes.tolist()):
        crop = photos[photo][1][:, top:top + side, left:left + side]
        assert torch.equal(image, crop) or torch.equal(image, crop.flip(-1))


def test_tokenizer_round_trip_on_a_real_photo(tmp_path):
    import skimage.data
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 255
    tokenizer = PaletteTokenizer.fit(photo, num_colors=64, grid_size=32, iterations=8)
    codes = tokenizer.encode(photo)
    assert codes.shape == (1, 32, 32) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64 and codes.unique().numel() > 32
    target = torch.nn.functional.interpolate(photo, size=(32, 32), mode="area")
    decoded = tokenizer.decode(codes)
    rmse = float((decoded - target).square().mean().sqrt())
    assert rmse < 0.05, rmse  # vs ~0.25 for a constant image
    assert float((target - target.mean()).square().mean().sqrt()) > 0.15
    assert tokenizer.decode(codes, image_size=128).shape == (1, 3, 128, 128)
    path = str(tmp_path / "tok.safetensors")
    tokenizer.save(path)
    loaded = PaletteTokenizer.load(path)
    assert loaded.grid_size == 32 and torch.equal(loaded.encode(photo), codes)
    with pytest.raises(ValueError, match="codes must lie"):
        tokenizer.decode(torch.full((1, 4, 4), 64))
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="bad.safetensors"):
        PaletteTokenizer.load(str(tmp_path / "bad.safetensors"))


def test_kmeans_recovers_separated_clusters():
    centres = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.3], [0.3, 0.3, 0.9]])
    pixels = centres.repeat(500, 1) + 0.01 * torch.randn(2000, 3)
    palette = fit_palette(pixels, 4, iterations=10)
    distance = torch.cdist(centres, palette).min(1).values
    assert float(distance.max()) < 0.02
