"""`dpar sample --num-images N --batch-size B`: many images with continuous batching, written as they finish.

DPAR keeps B slots busy (dpar.model.dpar_sampler.DparSampler): when an image finishes, its codes are appended to
the output and a new image starts in its slot while the others go on. Image i has class labels[i % len(labels)] and
its own sampling noise (a generator seeded with image_seed(seed, i)), so its codes do not depend on the schedule or
on which images shared its batch (nor on B, up to the rounding of differently sized matrix products), and a killed
run resumes where it stopped. The baseline samples
fixed batches of B (every image takes the same T steps), seeded by their first image.

Output folder: ``codes.bin``, records of int32 [3 + H*W] (image index, label, patches, codes in raster order),
appended and flushed as images finish (a partial record left by a kill is dropped on resume), and ``run.json``
(the settings; a resume with other settings is refused). read_codes() reads them back.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from dpar.model.dpar_sampler import DparSampler

CODES, RUN = "codes.bin", "run.json"
HEADER = 3  # image index, label, patches (global tokens = patches + 1)


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s sampling noise."""
    return seed * 1_000_003 + index


def read_codes(folder: str, tokens: int) -> dict[int, tuple[int, int, np.ndarray]]:
    """{image index: (label, patches, codes int32 [tokens])} of the complete records in ``folder``."""
    path = os.path.join(folder, CODES)
    if not os.path.exists(path):
        return {}
    raw = np.fromfile(path, dtype=np.int32)
    records = raw[:raw.size - raw.size % (HEADER + tokens)].reshape(-1, HEADER + tokens)
    return {int(r[0]): (int(r[1]), int(r[2]), r[HEADER:]) for r in records}


class _CodeWriter:
    """Appends records to folder/codes.bin, dropping a partial trailing record left by a killed run."""

    def __init__(self, folder: str, tokens: int):
        path = os.path.join(folder, CODES)
        record = 4 * (HEADER + tokens)
        if os.path.exists(path):
            size = os.path.getsize(path)
            if size % record:
                os.truncate(path, size - size % record)
        self.file = open(path, "ab")

    def write(self, indices, labels, patches, codes: np.ndarray) -> None:
        header = np.stack([np.asarray(indices), np.asarray(labels), np.asarray(patches)], 1)
        self.file.write(np.concatenate([header, codes], 1).astype(np.int32).tobytes())
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _check_run(folder: str, settings: dict) -> None:
    """Writes folder/run.json, or checks that a resumed run has the same settings (ValueError)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RUN)
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise ValueError(f"{folder} holds a run with other settings ({', '.join(changed)}); use another --out")
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)


def _image_noise(sampler: DparSampler, indices: list[int], seed: int) -> torch.Tensor | None:
    draws = [sampler.draw_noise(1, torch.Generator().manual_seed(image_seed(seed, i))) for i in indices]
    return None if draws[0] is None else torch.cat(draws)


def sample_many(model, labels: list[int], *, num_images: int, batch_size: int, out: str, seed: int = 0,
                entropy_model=None, threshold=None, max_patch_size: int = 4, cfg_scale: float = 1.0,
                temperature: float = 1.0, top_k=None, top_p=None, schedule="out_of_step", compile=False,
                settings: dict | None = None, progress: bool = True) -> dict:
    """Samples images [0, num_images) not yet in ``out`` -> summary: images (sampled now), seconds, images_per_s,
    global_tokens_per_image, and for DPAR global_steps_per_image / local_steps_per_image (step invocations, each
    over a batch, per image sampled). ``settings`` (JSON-able) identify the run for resuming."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not labels or min(labels) < 0 or max(labels) >= model.config.num_classes:
        raise ValueError(f"labels must be a non-empty list of classes in [0, {model.config.num_classes}), got {labels}")
    tokens = model.config.tokens_per_image
    _check_run(out, dict(settings or {}, num_images=num_images, seed=seed, labels=list(labels)))
    done = read_codes(out, tokens)
    todo = [i for i in range(num_images) if i not in done]
    writer = _CodeWriter(out, tokens)
    bar = tqdm(total=num_images, initial=num_images - len(todo), unit="image", disable=not progress)
    device = model.head.weight.device
    start = time.perf_counter()
    try:
        knobs = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, compile=compile)
        if entropy_model is None:
            stats = _baseline_batches(model, labels, todo, batch_size, seed, knobs, writer, bar, device)
        else:
            sampler = DparSampler(model, batch_size, entropy_model=entropy_model, threshold=threshold,
                                  max_patch_size=max_patch_size, schedule=schedule, **knobs)
            stats = _continuous(sampler, labels, todo, seed, writer, bar, device)
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - start
    count = len(todo)
    return dict(stats, images=count, seconds=seconds, images_per_s=count / seconds if count else 0.0)


def _continuous(sampler: DparSampler, labels: list[int], todo: list[int], seed: int, writer, bar, device) -> dict:
    """Keeps the sampler's slots busy with the images ``todo``; writes each as it finishes."""
    tokens = sampler.tokens.shape[1]
    queue, slots, patches_total = list(todo), [None] * sampler.batch, 0

    def fill(free: list[int]) -> None:
        starting = [(s, queue.pop(0)) for s in free[:len(queue)]]
        if not starting:
            return
        for s, i in starting:
            slots[s] = i
        ids = [i for _, i in starting]
        sampler.load(torch.tensor([s for s, _ in starting], device=device),
                     torch.tensor([labels[i % len(labels)] for i in ids], device=device),
                     _image_noise(sampler, ids, seed))

    fill(list(range(sampler.batch)))
    loaded = sum(s is not None for s in slots)
    while loaded:
        unfinished = sampler.step()
        if unfinished == loaded:
            continue
        finished = (sampler.images.position == tokens).cpu().tolist()
        ready = [s for s, image in enumerate(slots) if image is not None and finished[s]]
        codes = sampler.tokens[ready].cpu().numpy()
        patches = sampler.images.boundary[ready].sum(1).cpu().numpy()
        ids = [slots[s] for s in ready]
        writer.write(ids, [labels[i % len(labels)] for i in ids], patches, codes)
        patches_total += int(patches.sum())
        bar.update(len(ready))
        for s in ready:
            slots[s] = None
        fill(ready)
        loaded = sum(s is not None for s in slots)
    count = max(len(todo), 1)
    return dict(global_tokens_per_image=(patches_total + len(todo)) / count,
                global_steps_per_image=sampler.global_steps / count, local_steps_per_image=sampler.local_steps / count)


def _baseline_batches(model, labels, todo, batch_size, seed, knobs, writer, bar, device) -> dict:
    """Fixed batches of the baseline (all images take T steps), each seeded by its first image."""
    tokens = model.config.tokens_per_image
    for first in range(0, len(todo), batch_size):
        ids = todo[first:first + batch_size]
        image_labels = [labels[i % len(labels)] for i in ids]
        codes = model.generate(torch.tensor(image_labels, device=device),
                               generator=torch.Generator(device).manual_seed(image_seed(seed, ids[0])), **knobs)
        writer.write(ids, image_labels, [tokens] * len(ids), codes.cpu().numpy())
        bar.update(len(ids))
    return dict(global_tokens_per_image=float(tokens + 1))
