"""Datasets of VQ token grids, and leak-free crops of the photographs shipped with scikit-image.

On disk a token dataset is the layout LlamaGen's ``extract_codes`` step writes:
``ROOT/codes/<i>.npy`` (integer codes of one image: [T], [1, T], [H, W], [1, H, W], or with an augmentation /
ten-crop axis [A, T], [A, H, W], [1, A, T]) and ``ROOT/labels/<i>.npy`` (its class, any shape with one element).
An optional ``ROOT/meta.json`` gives ``grid_height``, ``grid_width``, ``vocab_size`` and ``num_classes``.
Labels must be integers in [0, num_classes) (num_classes itself is the model's null class). Every unreadable or
inconsistent file is a ValueError naming it.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

META_FILE = "meta.json"
PRELOAD_BYTES = 256 * 2 ** 20  # TokenGridDataset.preload: datasets whose int64 tokens fit are read into memory once
META_FIELDS = ("grid_height", "grid_width", "vocab_size", "num_classes")
# Every photograph (colour or grey) that scikit-image ships inside its wheel; synthetic images (binary_blobs,
# checkerboard, colorwheel, horse, logo, shepp_logan_phantom), duplicates ("cat" is "chelsea") and the image sets
# that need a download (pooch) are left out. stereo_motorcycle contributes its left view only.
OFFLINE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
                  "stereo_motorcycle", "text")


def _numbered_files(folder: str) -> dict[str, str]:
    """{stem: path} of the ``<stem>.npy`` files in ``folder``."""
    return {name[:-4]: os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".npy")}


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
    """np.load with errors (truncated, not .npy, pickled objects) naming ``path``."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy file (truncated or corrupt?): {error}") from error


def _sort_key(stem: str):
    return (0, int(stem), "") if re.fullmatch(r"\d+", stem) else (1, 0, stem)


def _layout(shape: tuple[int, ...], grid: tuple[int, int] | None, path: str) -> tuple[int, tuple[int, int]]:
    """(variants, (H, W)) of a codes array of ``shape``; ``grid`` (when known) settles ambiguous 2D shapes.

    A leading axis of size 1 is dropped ([1, T], [1, H, W], [1, A, T]). Then [T] is one flat grid, [A, H, W] holds
    A variants, and [x, y] is A=x variants of T=y tokens when y == H*W of the known grid, else an x-by-y grid;
    without a known grid, [x, y] with x != y and a square y is read as variants (LlamaGen's ten-crop).
    """
    dims = shape[1:] if len(shape) > 1 and shape[0] == 1 else shape
    if len(dims) == 1:
        if grid is None:
            side = math.isqrt(dims[0])
            if side * side != dims[0]:
                raise ValueError(f"cannot infer the grid of {path} (shape {shape}); pass grid_height/grid_width "
                                 f"or write {META_FILE}")
            grid = (side, side)
        return 1, grid
    if len(dims) == 3:
        return dims[0], grid or (dims[1], dims[2])
    if len(dims) != 2:
        raise ValueError(f"codes file {path} has unsupported shape {shape}")
    x, y = dims
    if grid is not None:
        return (x, grid) if y == grid[0] * grid[1] and (x, y) != tuple(grid) else (1, grid)
    side = math.isqrt(y)
    if x != y and side * side == y:
        return x, (side, side)
    return 1, (x, y)


class TokenGridDataset(Dataset):
    """Lazily loaded token grids: item i -> (codes int64 [T], label int64 scalar).

    Every augmentation variant of an image is its own item (index space = images x variants), so that the
    order of training data is a pure function of the sampler. ``vocab_size`` / ``num_classes`` default to
    meta.json or, without one, to a scan of all files (max + 1).
    """

    def __init__(self, root: str, grid_height: int | None = None, grid_width: int | None = None,
                 vocab_size: int | None = None, num_classes: int | None = None):
        codes_dir, labels_dir = os.path.join(root, "codes"), os.path.join(root, "labels")
        for folder in (codes_dir, labels_dir):
            if not os.path.isdir(folder):
                raise ValueError(f"data root {root!r} has no {os.path.basename(folder)}/ folder")
        codes, labels = _numbered_files(codes_dir), _numbered_files(labels_dir)
        if not codes:
            raise ValueError(f"data root {root!r}: codes/ holds no .npy files")
        missing = sorted(set(codes) - set(labels))
        if missing:
            raise ValueError(f"data root {root!r}: no labels/{missing[0]}.npy for codes/{missing[0]}.npy")
        self.root = root
        self._memory: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, labels) once preloaded
        self.stems = sorted(codes, key=_sort_key)
        self._codes_paths = [codes[s] for s in self.stems]
        self._label_paths = [labels[s] for s in self.stems]
        meta = self._read_meta(root)
        known = (grid_height or meta.get("grid_height"), grid_width or meta.get("grid_width"))
        first_shape = _load_npy(self._codes_paths[0], mmap=True).shape
        self.variants, grid = _layout(first_shape, None if None in known else known, self._codes_paths[0])
        self.grid_height, self.grid_width = int(grid[0]), int(grid[1])
        self.tokens_per_image = self.grid_height * self.grid_width
        self.vocab_size = vocab_size or meta.get("vocab_size")
        self.num_classes = num_classes or meta.get("num_classes")
        if self.vocab_size is None or self.num_classes is None:
            self._scan_sizes()

    @staticmethod
    def _read_meta(root: str) -> dict:
        path = os.path.join(root, META_FILE)
        if not os.path.exists(path):
            return {}
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not readable JSON: {error}") from error
        if not isinstance(meta, dict):
            raise ValueError(f"{path} must hold a JSON object with {', '.join(META_FIELDS)}")
        for key in META_FIELDS:
            value = meta.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{path}: {key} must be an integer >= 1, got {value!r}")
        return meta

    def _variants(self, image: int) -> np.ndarray:
        """codes of one image as [A, T] (memory-mapped), checked against the dataset's layout."""
        path = self._codes_paths[image]
        codes = _load_npy(path, mmap=True)
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes file {path} has dtype {codes.dtype}; codes must be integers")
        variants = codes.reshape(-1, self.tokens_per_image) if codes.size % self.tokens_per_image == 0 else codes
        if variants.shape != (self.variants, self.tokens_per_image):
            raise ValueError(f"codes file {path} has shape {codes.shape}; expected {self.variants} variant(s) of "
                             f"{self.grid_height}x{self.grid_width}={self.tokens_per_image} tokens")
        return variants

    def _scan_sizes(self) -> None:
        max_code = max_label = -1
        for i in range(len(self.stems)):
            max_code = max(max_code, int(self._variants(i).max()))
            max_label = max(max_label, self._label(i))
        self.vocab_size = self.vocab_size or max_code + 1
        self.num_classes = self.num_classes or max_label + 1

    def _label(self, image: int) -> int:
        path = self._label_paths[image]
        label = _load_npy(path)
        if label.size != 1:
            raise ValueError(f"labels file {path} must hold one label, has shape {label.shape}")
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"labels file {path} has dtype {label.dtype} (value {label.reshape(())}); labels must "
                             f"be integers")
        value = int(label.reshape(()))
        if value < 0 or (self.num_classes is not None and value >= self.num_classes):
            raise ValueError(f"labels file {path} holds class {value}, outside [0, {self.num_classes}) "
                             f"(class {self.num_classes} would be the model's null class)")
        return value

    def __len__(self) -> int:
        return len(self.stems) * self.variants

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        image, variant = divmod(index, self.variants)
        codes = torch.from_numpy(np.array(self._variants(image)[variant], dtype=np.int64))
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"codes file {self._codes_paths[image]} has codes outside [0, {self.vocab_size})")
        return codes, torch.tensor(self._label(image), dtype=torch.int64)

    def preload(self, max_bytes: int = PRELOAD_BYTES) -> bool:
        """Reads every item once into memory (each checked as ``__getitem__`` checks it) when their int64 tokens fit
        in ``max_bytes``, so that ``batch`` slices memory instead of reading two files per item; returns whether
        the items are in memory. Larger datasets stay on disk (read per batch)."""
        if self._memory is None and len(self) * self.tokens_per_image * 8 <= max_bytes:
            self._memory = self.batch(torch.arange(len(self)))
        return self._memory is not None

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` int [B] -> (tokens int64 [B, T], labels int64 [B])."""
        if self._memory is not None:
            tokens, labels = self._memory
            return tokens[indices], labels[indices]
        items = [self[int(i)] for i in indices]
        return torch.stack([t for t, _ in items]), torch.stack([label for _, label in items])


def write_token_dataset(root: str, codes: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                        num_classes: int) -> None:
    """Write codes [N, H, W] and labels [N] in the extract_codes layout (codes/<i>.npy as [1, H*W])."""
    if codes.ndim != 3 or labels.shape != codes.shape[:1]:
        raise ValueError(f"codes must be [N, H, W] and labels [N]; got {tuple(codes.shape)} and {tuple(labels.shape)}")
    os.makedirs(os.path.join(root, "codes"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    flat = codes.reshape(codes.shape[0], 1, -1).cpu().numpy().astype(np.int32 if vocab_size > 32767 else np.int16)
    for i in range(codes.shape[0]):
        np.save(os.path.join(root, "codes", f"{i}.npy"), flat[i])
        np.save(os.path.join(root, "labels", f"{i}.npy"), np.array([int(labels[i])], dtype=np.int64))
    meta = {"grid_height": codes.shape[1], "grid_width": codes.shape[2], "vocab_size": vocab_size,
            "num_classes": num_classes}
    with open(os.path.join(root, META_FILE), "w") as f:
        json.dump(meta, f)


def load_offline_photos(short_side: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The photographs of OFFLINE_PHOTOS that load without a network: [(name, float32 [3, H, W] in [0, 1])].

    Grey photos are repeated to three channels. ``short_side``: every photo is resized (antialiased) so that its
    shorter side has this many pixels, which makes a crop of a given size cover the same share of every photo.
    """
    import skimage.data

    photos = []
    for name in OFFLINE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a photo that needs a download (pooch) is simply not part of the set
            continue
        image = np.asarray(image[0] if isinstance(image, tuple) else image)
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
        photo = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        if short_side is not None:
            height, width = photo.shape[1:]
            scale = short_side / min(height, width)
            size = (max(short_side, round(height * scale)), max(short_side, round(width * scale)))
            photo = torch.nn.functional.interpolate(photo[None], size=size, mode="bilinear",
                                                    antialias=True)[0].clamp_(0, 1)
        photos.append((name, photo))
    if len(photos) < 2:
        raise RuntimeError("fewer than two scikit-image photographs load offline; install scikit-image fully")
    return photos


@dataclass(frozen=True)
class Region:
    """A square block of one photo: pixels [top, top + size) x [left, left + size) of photos[photo]."""
    photo: int
    top: int
    left: int
    size: int


def split_regions(photos: list[tuple[str, torch.Tensor]], region_size: int, heldout_fraction: float,
                  seed: int) -> tuple[list[Region], list[Region]]:
    """(training regions, held-out regions): every photo is tiled into disjoint region_size squares (the remainder
    at the right and bottom edges is unused) and round(heldout_fraction * tiles) of its tiles, at least one, chosen
    at random (``seed``), are held out. ValueError when a photo has fewer than two tiles."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, heldout = [], []
    for index, (name, photo) in enumerate(photos):
        rows, columns = photo.shape[1] // region_size, photo.shape[2] // region_size
        if rows * columns < 2:
            raise ValueError(f"photo {name!r} ({photo.shape[1]}x{photo.shape[2]}) holds fewer than two regions of "
                             f"{region_size} px; lower region_size")
        tiles = [Region(index, r * region_size, c * region_size, region_size)
                 for r in range(rows) for c in range(columns)]
        held = min(len(tiles) - 1, max(1, round(heldout_fraction * len(tiles))))
        order = torch.randperm(len(tiles), generator=generator).tolist()
        heldout += [tiles[i] for i in sorted(order[:held])]
        train += [tiles[i] for i in sorted(order[held:])]
    return train, heldout


def region_crops(photos: list[tuple[str, torch.Tensor]], regions: list[Region], count: int, size: int,
                 max_side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` random square crops, each inside one of ``regions``, resized to size x size.

    Photos take turns (label i % photos, over the photos that have a region here), then a random region of that
    photo, a random side in [size, min(max_side, region size)], a random position inside the region and a random
    horizontal flip. Returns images float32 [count, 3, size, size] in [0, 1], labels int64 [count] (the photo) and
    boxes int64 [count, 4] (photo, top, left, side) in the photo's pixels. Deterministic in ``seed``.
    """
    by_photo: dict[int, list[Region]] = {}
    for region in regions:
        if region.size < size:
            raise ValueError(f"region of {region.size} px is smaller than the crop size {size}")
        by_photo.setdefault(region.photo, []).append(region)
    owners = sorted(by_photo)
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, size, size)
    boxes = torch.empty(count, 4, dtype=torch.int64)
    for i in range(count):
        choices = by_photo[owners[i % len(owners)]]
        region = choices[int(torch.randint(len(choices), (), generator=generator))]
        largest = min(max_side, region.size)
        side = int(torch.randint(size, largest + 1, (), generator=generator))
        top = region.top + int(torch.randint(region.size - side + 1, (), generator=generator))
        left = region.left + int(torch.randint(region.size - side + 1, (), generator=generator))
        crop = photos[region.photo][1][None, :, top:top + side, left:left + side]
        if side != size:
            crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        images[i] = crop[0].flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop[0]
        boxes[i] = torch.tensor([region.photo, top, left, side])
    return images.clamp_(0, 1), boxes[:, 0].clone(), boxes


def boxes_overlap(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """bool [N, M]: box i of ``first`` [N, 4] and box j of ``second`` [M, 4] ((photo, top, left, side) each)
    share at least one pixel of the same photo."""
    a, b = first[:, None, :], second[None, :, :]
    rows = (a[..., 1] < b[..., 1] + b[..., 3]) & (b[..., 1] < a[..., 1] + a[..., 3])
    columns = (a[..., 2] < b[..., 2] + b[..., 3]) & (b[..., 2] < a[..., 2] + a[..., 3])
    return (a[..., 0] == b[..., 0]) & rows & columns


@dataclass
class CropSplit:
    """Training and held-out crops of the offline photos with no pixel shared between the splits.

    images float32 [N, 3, S, S], labels int64 [N] (the photo), boxes int64 [N, 4] (photo, top, left, side).
    """
    photo_names: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_boxes: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    heldout_boxes: torch.Tensor
    regions: tuple[int, int]  # (training regions, held-out regions)

    def summary(self) -> dict:
        return {"photos": self.photo_names, "train_crops": len(self.train_labels),
                "heldout_crops": len(self.heldout_labels), "train_regions": self.regions[0],
                "heldout_regions": self.regions[1]}


def leak_free_crops(train_count: int, heldout_count: int, size: int, seed: int = 0, *,
                    heldout_fraction: float = 0.25) -> CropSplit:
    """Crops of every offline photo (resized to a shorter side of 10 * size) for training and held-out use: each
    photo is tiled into regions of 2.5 * size px, a quarter of the regions are held out whole, and every crop
    (side size .. 2 * size, resized to size) lies inside one region of its split, so no held-out crop shares a
    pixel with a training crop. Class = photo."""
    photos = load_offline_photos(short_side=10 * size)
    train_regions, heldout_regions = split_regions(photos, size * 5 // 2, heldout_fraction, seed)
    train = region_crops(photos, train_regions, train_count, size, 2 * size, seed * 2 + 1)
    heldout = region_crops(photos, heldout_regions, heldout_count, size, 2 * size, seed * 2 + 2)
    return CropSplit([name for name, _ in photos], *train, *heldout, (len(train_regions), len(heldout_regions)))
