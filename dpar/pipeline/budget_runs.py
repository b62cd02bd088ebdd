"""Training runs to a FLOP budget through `dpar train` (constant lr), as `dpar demo` runs them: the demo's data
(leak-free crops, tokenizer, token datasets), its entropy model and patch tables, one budget run with a held-out
curve, and the curve plot."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from dpar_kernels.patching import static_patch_lengths

from ..model.config import ModelConfig
from ..model.flops import baseline_training_flops
from . import data, objectives, patchify, train
from .builders import load_model, make_config
from .tokenizer import PaletteTokenizer

MODEL_OVERRIDES = ("num_heads=2", "num_kv_heads=2")  # the tiny presets with head_dim 32


def prepare_data(out: str, settings: dict, seed: int) -> PaletteTokenizer:
    """Leak-free crops (data.leak_free_crops: held-out crops from held-out regions) -> tokenizer fitted on the
    training crops (out/tokenizer.safetensors) -> out/data/{train,val} token datasets; out/data/split.json
    describes the split (photos, regions, crops, held-out crops sharing a pixel with a training crop: 0)."""
    split = data.leak_free_crops(settings["train_images"], settings["val_images"], settings["image_size"], seed)
    tokenizer = PaletteTokenizer.fit(split.train_images, settings["colors"], settings["grid"], seed=seed)
    tokenizer.save(os.path.join(out, "tokenizer.safetensors"))
    classes = len(split.photo_names)
    for name, images, labels in (("train", split.train_images, split.train_labels),
                                 ("val", split.heldout_images, split.heldout_labels)):
        data.write_token_dataset(os.path.join(out, "data", name), tokenizer.encode(images), labels,
                                 tokenizer.vocab_size, classes)
    overlaps = int(data.boxes_overlap(split.heldout_boxes, split.train_boxes).any(1).sum())
    with open(os.path.join(out, "data", "split.json"), "w") as f:
        json.dump({**split.summary(), "heldout_crops_overlapping_training": overlaps}, f, indent=1)
    return tokenizer


def train_model(kind: str, data_dir: str, out: str, settings: dict, seed: int, *, steps: int | None = None,
                flop_budget: float | None = None, patches: str | None = None, overrides: tuple[str, ...] = (),
                on_step=None) -> list[dict]:
    """``dpar train KIND`` on CPU with the tiny preset (head_dim 32, plus ``overrides``), ``settings``' batch size
    and lr, for ``steps`` or up to ``flop_budget``; ``patches``: a PatchTable file for DPAR."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = [kind, "--data", data_dir, "--out", out, "--batch-size", str(settings["batch_size"]), "--seed", str(seed),
            "--lr", str(settings["lr"]), "--quiet", "--device", "cpu", "--ckpt-every", "1000000000"]
    argv += ["--steps", str(steps)] if steps is not None else []
    argv += ["--flop-budget", repr(flop_budget)] if flop_budget is not None else []
    argv += ["--patches", patches] if patches is not None else []
    argv += ["--override", *MODEL_OVERRIDES, *overrides]
    return train.train(parser.parse_args(argv), on_step=on_step)


class Progress:
    """on_step callback: a line every ``every`` steps (loss, share of the budget, time left); held-out NLL at
    ``points`` equally spaced fractions of the FLOP budget (the curve)."""

    def __init__(self, name: str, budget: float, points: int, evaluate_nll, every: int = 25):
        self.name, self.budget, self.evaluate_nll, self.every = name, budget, evaluate_nll, every
        self.marks = [budget * (k + 1) / points for k in range(points)]
        self.curve: list[list[float]] = []
        self.started = time.perf_counter()

    def __call__(self, record: dict, model) -> None:
        flops = record["cum_flops"]
        if self.marks and flops >= self.marks[0]:
            while self.marks and flops >= self.marks[0]:
                self.marks.pop(0)
            self.curve.append([flops, self.evaluate_nll(model)])
        if record["step"] % self.every == 0 or not self.marks:
            elapsed = time.perf_counter() - self.started
            share = min(flops / self.budget, 1.0)
            left = elapsed * (1 - share) / share if share else float("nan")
            held = f", held-out {self.curve[-1][1]:.4f}" if self.curve else ""
            print(f"  [{self.name}] step {record['step']}: loss {record['loss']:.4f}{held}, "
                  f"{100 * share:.0f}% of the FLOP budget, {elapsed:.0f}s, ~{left:.0f}s left", flush=True)


def _nll_function(val, val_table, batch_size: int):
    source = None if val_table is None else objectives.PatchSource(table=val_table)

    def nll(model) -> float:
        return objectives.heldout_loss(objectives.LossModule(model, val.grid_width), val, source, batch_size)
    return nll


def budget_run(name: str, kind: str, patching: str, out: str, settings: dict, seed: int, budget: float,
               train_dir: str, val, tables: tuple | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """One training run stopped at ``budget`` FLOPs, with its held-out curve. ``tables`` = (train, val)
    PatchTables for DPAR (None for the baseline); ``overrides``: config fields ("key=value")."""
    run_dir = os.path.join(out, "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    train_table, val_table = tables or (None, None)
    patches = None
    if train_table is not None:
        patches = os.path.join(run_dir, "patches.pt")
        train_table.save(patches)
    progress = Progress(name, budget, settings["points"], _nll_function(val, val_table, settings["batch_size"]))
    print(f"training {name} ({patching}) to {budget:.3e} FLOPs", flush=True)
    started = time.perf_counter()
    records = train_model(kind, train_dir, run_dir, settings, seed, flop_budget=budget, patches=patches,
                          overrides=overrides, on_step=progress)
    seconds = time.perf_counter() - started
    def per_image(table) -> float:
        return float(val.tokens_per_image) if table is None else table.patch_lengths.numel() / len(table)
    return {"name": name, "kind": kind, "patching": patching, "global_tokens_per_image": per_image(train_table),
            "heldout_global_tokens_per_image": per_image(val_table),
            "train_flops": records[-1]["cum_flops"], "flop_budget": budget, "steps": records[-1]["step"],
            "flops_per_step": records[-1]["cum_flops"] / records[-1]["step"], "curve": progress.curve,
            "final_nll": progress.curve[-1][1], "final_train_loss": records[-1]["loss"], "seconds": seconds,
            "overrides": list(overrides)}


def static_table(patches_per_image: int, entropies: torch.Tensor, grid_width: int) -> patchify.PatchTable:
    """Static patches (static_patch_lengths), ``patches_per_image`` per item of ``entropies`` [N, T]."""
    lengths, cu = static_patch_lengths(entropies.shape[0], grid_height=entropies.shape[1] // grid_width,
                                       grid_width=grid_width, patches_per_image=patches_per_image)
    return patchify.PatchTable(lengths, cu, entropies, float("nan"), int(lengths.max()), grid_width)


def baseline_step_flops(train_dir: str, batch_size: int, overrides: tuple[str, ...] = ()) -> float:
    """Training FLOPs of one baseline step of the tiny preset with MODEL_OVERRIDES and ``overrides``, as
    train_model builds it."""
    dataset = data.TokenGridDataset(train_dir)
    config = ModelConfig(**make_config("baseline", "tiny", dataset, [*MODEL_OVERRIDES, *overrides]))
    return float(baseline_training_flops(config, batch_size)["total"])


def plot_curves(runs: list[dict], path: str) -> None:
    from .sample import _pyplot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        flops, nll = zip(*run["curve"])
        axis.plot([f / 1e12 for f in flops], nll, marker="o", label=f"{run['name']} ({run['patching']})")
    axis.set_xlabel("training TFLOPs")
    axis.set_ylabel("held-out NLL (nats / token)")
    axis.set_title("Held-out NLL at equal training FLOPs")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def prepare_patches(out: str, settings: dict, seed: int, target_reduction: float, max_patch_size: int = 4):
    """Data, the entropy model and the (train, val) PatchTables of the entropy, static and one-token runs."""
    tokenizer = prepare_data(out, settings, seed)
    train_dir, val_dir = os.path.join(out, "data", "train"), os.path.join(out, "data", "val")
    entropy_dir = os.path.join(out, "entropy")
    print(f"training the entropy model ({settings['entropy_steps']} steps)", flush=True)
    train_model("entropy", train_dir, entropy_dir, settings, seed, steps=settings["entropy_steps"])
    entropy_ckpt = os.path.join(entropy_dir, train.CHECKPOINT)
    entropy_model, _ = load_model(entropy_ckpt, "entropy")
    val = data.TokenGridDataset(val_dir)
    entropies = {"train": patchify.dataset_entropies(entropy_model, data.TokenGridDataset(train_dir)),
                 "val": patchify.dataset_entropies(entropy_model, val)}
    threshold = patchify.threshold_for_reduction(entropies["train"], target_reduction, max_patch_size,
                                                 val.grid_width)
    entropy_tables = tuple(patchify.PatchTable.from_entropies(entropies[s], threshold, max_patch_size,
                                                              val.grid_width) for s in ("train", "val"))
    per_image = round(entropy_tables[0].patch_lengths.numel() / len(entropy_tables[0]))
    tables = {"entropy": entropy_tables,
              "static": tuple(static_table(per_image, entropies[s], val.grid_width) for s in ("train", "val")),
              "one-token": tuple(patchify.PatchTable.from_entropies(entropies[s], float("-inf"), 1, val.grid_width)
                                 for s in ("train", "val"))}
    return tokenizer, entropy_model, entropy_ckpt, threshold, entropies, tables


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tiny models are latency bound, and on a shared "
                             "machine more threads mostly wait for each other)")
