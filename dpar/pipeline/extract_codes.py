"""`dpar extract-codes`: an ImageFolder tree (one sub-folder per class) -> a token dataset `dpar train` reads.

Each image is centre-cropped to --size (ADM / LlamaGen's ``center_crop_arr``) and encoded with a LlamaGen VQ
checkpoint; views per image: 1, 2 with --flip (image and mirror, LlamaGen's default) or 10 with --ten-crop (the four
corners and centre of a 1.1x centre crop and of its mirror, LlamaGen's --ten-crop; --flip is then implied).
Output, LlamaGen's layout: ``OUT/codes/<i>.npy`` ([1, views, T] integers), ``OUT/labels/<i>.npy`` ([1]) for the
i-th image of the sorted tree, and ``OUT/meta.json``. Resumable: images whose two files exist are skipped. Under
``torchrun --nproc-per-node G -m dpar extract-codes ...`` rank r encodes images r, r+G, ... on cuda:LOCAL_RANK.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import META_FILE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEN_CROP_RANGE = 1.1


def list_images(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(image path, class index)]) of an ImageFolder tree, in torchvision's order."""
    if not os.path.isdir(root):
        raise ValueError(f"--images {root!r} is not a folder")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, file), label) for file in sorted(files)
                        if file.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise ValueError(f"--images {root!r} holds no class sub-folders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: box-halve while the short side is >= 2 size, bicubic-resize it to size, crop -> uint8
    [size, size, 3] (for a short side below 2 size LlamaGen calls it with 1.1 size and crops further)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def _five_crops(array: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's five_crop order: top-left, top-right, bottom-left, bottom-right, centre."""
    height, width = array.shape[:2]
    top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), (top, left)]
    return [array[y:y + size, x:x + size] for y, x in corners]


def image_views(image: Image.Image, size: int, ten_crop: bool = False, flip: bool = False) -> torch.Tensor:
    """The views of one image, float32 [A, 3, size, size] in [-1, 1] (A = 10, 2 or 1, see the module doc)."""
    if ten_crop:
        array = center_crop(image, int(size * TEN_CROP_RANGE))
        views = _five_crops(array, size) + _five_crops(array[:, ::-1], size)
    else:
        array = center_crop(image, size)
        views = [array, array[:, ::-1]] if flip else [array]
    stacked = torch.from_numpy(np.stack(views).copy()).permute(0, 3, 1, 2)
    return stacked.float().div_(127.5).sub_(1)


class ImageViewDataset(Dataset):
    """Item k -> (image index, views float32 [A, 3, S, S], label int64) of the k-th of the selected images."""

    def __init__(self, samples: list[tuple[str, int]], indices: list[int], size: int, ten_crop: bool, flip: bool):
        self.samples, self.indices = samples, indices
        self.size, self.ten_crop, self.flip = size, ten_crop, flip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                views = image_views(image.convert("RGB"), self.size, self.ten_crop, self.flip)
        except OSError as error:  # PIL's UnidentifiedImageError and truncated files
            raise ValueError(f"cannot read image {path}: {error}") from error
        return index, views, label


def shard(count: int, rank: int, world_size: int) -> list[int]:
    """Image indices of one rank: rank, rank + world_size, ... (DistributedSampler without shuffle or padding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    return list(range(rank, count, world_size))


def distributed_position(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank): explicit values, else torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else one
    process."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


def _paths(out: str, index: int) -> tuple[str, str]:
    return os.path.join(out, "codes", f"{index}.npy"), os.path.join(out, "labels", f"{index}.npy")


def pending(out: str, indices: list[int]) -> list[int]:
    """The indices whose codes or labels file is not written yet."""
    return [i for i in indices if not all(os.path.exists(path) for path in _paths(out, i))]


def _save_atomic(path: str, array: np.ndarray) -> None:
    """np.save via a temporary name, so that an interrupted run never leaves a truncated file behind."""
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        np.save(f, array)
    os.replace(partial, path)


def _write_meta(out: str, meta: dict) -> None:
    """meta.json; ValueError when ``out`` already holds codes written with other settings."""
    path = os.path.join(out, META_FILE)
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != meta:
            raise ValueError(f"{out!r} already holds codes extracted with other settings ({existing}); "
                             f"use a fresh --out or the same arguments to resume")
        return
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(partial, path)


def extract_codes(args: argparse.Namespace) -> int:
    """Encode this rank's unfinished images; returns how many it wrote."""
    from tqdm import tqdm

    from dpar.model.vq import VQTokenizer

    rank, world_size, local_rank = distributed_position(args.rank, args.world_size)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    tokenizer = VQTokenizer.load(args.vq_ckpt, device)
    downsample = tokenizer.config.downsample
    if args.size <= 0 or args.size % downsample:
        raise ValueError(f"--size must be a positive multiple of {downsample}; got {args.size}")
    classes, samples = list_images(args.images)
    views = 10 if args.ten_crop else 2 if args.flip else 1
    grid = args.size // downsample
    for folder in ("codes", "labels"):
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
    if rank == 0:
        _write_meta(args.out, {"grid_height": grid, "grid_width": grid, "vocab_size": tokenizer.vocab_size,
                               "num_classes": len(classes), "image_size": args.size, "views": views,
                               "classes": classes})
    todo = pending(args.out, shard(len(samples), rank, world_size))
    loader = DataLoader(ImageViewDataset(samples, todo, args.size, args.ten_crop, args.flip),
                        batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    code_dtype = np.int16 if tokenizer.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32
    with tqdm(total=len(todo), desc=f"extract-codes rank {rank}/{world_size}", position=rank,
              disable=args.quiet) as progress:
        for indices, batch, labels in loader:
            codes = tokenizer.encode(batch.flatten(0, 1))
            codes = codes.reshape(len(indices), 1, views, grid * grid).cpu().numpy().astype(code_dtype)
            for index, image_codes, label in zip(indices.tolist(), codes, labels.tolist()):
                codes_path, label_path = _paths(args.out, index)
                _save_atomic(label_path, np.array([label], dtype=np.int64))
                _save_atomic(codes_path, image_codes)
            progress.update(len(indices))
    return len(todo)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq-ckpt", required=True, help="LlamaGen VQ checkpoint (vq_ds16_c2i.pt)")
    parser.add_argument("--images", required=True, help="ImageFolder tree: one sub-folder of images per class")
    parser.add_argument("--size", type=int, default=256, help="centre-crop size (a multiple of 16)")
    parser.add_argument("--ten-crop", action="store_true", help="10 views: corners and centre, and mirrored")
    parser.add_argument("--flip", action="store_true", help="2 views: the image and its mirror")
    parser.add_argument("--out", required=True, help="output dataset root (codes/, labels/, meta.json)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="JPEG-decoding worker processes (0: in the main process)")
    parser.add_argument("--rank", type=int, help="this shard (default: $RANK from torchrun, else 0)")
    parser.add_argument("--world-size", type=int, help="number of shards (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    written = extract_codes(args)
    print(f"{written} images encoded -> {args.out}")
