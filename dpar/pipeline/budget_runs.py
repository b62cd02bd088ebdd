"""Training runs to a FLOP budget through `dpar train` (constant lr), as `dpar demo` runs them: the demo's data
(leak-free crops, tokenizer, token datasets), its entropy model and patch tables, one budget run with a held-out
curve (from the untrained model on), and the curve plot. Each run shows a progress bar (dpar.pipeline.progress)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from dpar_kernels.patching import static_patch_lengths

from ..model.config import ModelConfig
from ..model.flops import baseline_training_flops
from . import data, objectives, patchify, progress, train
from .builders import build_model, make_config
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
    """``dpar train KIND`` on CPU with ``settings``' preset ("size", default tiny; head_dim 32, plus ``overrides``),
    batch size and lr, for ``steps`` or up to ``flop_budget``; ``patches``: a PatchTable file for DPAR."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = [kind, "--data", data_dir, "--out", out, "--batch-size", str(settings["batch_size"]), "--seed", str(seed),
            "--lr", str(settings["lr"]), "--quiet", "--device", "cpu", "--ckpt-every", "1000000000",
            "--size", model_size(kind, settings)]
    argv += ["--steps", str(steps)] if steps is not None else []
    argv += ["--flop-budget", repr(flop_budget)] if flop_budget is not None else []
    argv += ["--patches", patches] if patches is not None else []
    argv += ["--override", *MODEL_OVERRIDES, *overrides]
    return train.train(parser.parse_args(argv), on_step=on_step)


def model_size(kind: str, settings: dict) -> str:
    """The preset of ``kind`` under ``settings`` ("size"; the entropy model is always the tiny one)."""
    return "tiny" if kind == "entropy" else settings.get("size", "tiny")


class Progress:
    """on_step callback: a progress bar over the FLOP budget (loss, last held-out NLL, elapsed and remaining time);
    held-out NLL at ``points`` equally spaced fractions of the budget, after ``start`` (the curve)."""

    def __init__(self, name: str, budget: float, points: int, evaluate_nll, start: list[float]):
        self.budget, self.evaluate_nll = budget, evaluate_nll
        self.marks = [budget * (k + 1) / points for k in range(points)]
        self.curve: list[list[float]] = [start]
        self.bar = progress.bar(budget, f"  {name}", unit="FLOP", unit_scale=True,
                                bar_format="{desc}: {percentage:3.0f}% of the FLOP budget |{bar:20}| "
                                           "[{elapsed}<{remaining}]{postfix}")

    def __call__(self, record: dict, model) -> None:
        flops = record["cum_flops"]
        if self.marks and flops >= self.marks[0]:
            while self.marks and flops >= self.marks[0]:
                self.marks.pop(0)
            self.curve.append([flops, self.evaluate_nll(model)])
        self.bar.set_postfix_str(f"step {record['step']}, loss {record['loss']:.3f}, "
                                 f"held-out {self.curve[-1][1]:.3f}", refresh=False)
        self.bar.update(min(flops, self.budget) - self.bar.n)
        if not self.marks:
            self.bar.close()


def nll_function(val, val_table, batch_size: int):
    """model -> held-out NLL (nats / token) of ``val`` (patches of ``val_table`` for DPAR, None for the baseline)."""
    source = None if val_table is None else objectives.PatchSource(table=val_table)
    val.preload()  # evaluated many times: read once

    def nll(model) -> float:
        return objectives.heldout_loss(objectives.LossModule(model, val.grid_width), val, source, batch_size)
    return nll


def budget_run(name: str, kind: str, patching: str, out: str, settings: dict, seed: int, budget: float,
               train_dir: str, val, tables: tuple | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """One training run (into out/runs/NAME) stopped at ``budget`` FLOPs, with its held-out curve from the
    untrained model (same seed) on. ``tables`` = (train, val) PatchTables for DPAR (None for the baseline);
    ``overrides``: config fields ("key=value"). "train_seconds" sums the optimizer steps' own times (no held-out
    evaluation, no checkpoint), "median_step_seconds" is their median; "seconds" is the run's wall time."""
    run_dir = os.path.join(out, "runs", name)
    os.makedirs(run_dir, exist_ok=True)
    train_table, val_table = tables or (None, None)
    patches = None
    if train_table is not None:
        patches = os.path.join(run_dir, "patches.pt")
        train_table.save(patches)
    started = time.perf_counter()
    nll = nll_function(val, val_table, settings["batch_size"])
    torch.manual_seed(seed)  # the initialisation `dpar train` starts from
    untrained = build_model(kind, make_config(kind, model_size(kind, settings), data.TokenGridDataset(train_dir),
                                              [*MODEL_OVERRIDES, *overrides]))
    progress = Progress(f"{name} ({patching})", budget, settings["points"], nll, [0.0, nll(untrained)])
    records = train_model(kind, train_dir, run_dir, settings, seed, flop_budget=budget, patches=patches,
                          overrides=overrides, on_step=progress)
    seconds = time.perf_counter() - started

    def per_image(table) -> float:
        return float(val.tokens_per_image) if table is None else table.patch_lengths.numel() / len(table)
    return {"name": name, "kind": kind, "patching": patching, "seed": seed,
            "global_tokens_per_image": per_image(train_table),
            "heldout_global_tokens_per_image": per_image(val_table),
            "train_flops": records[-1]["cum_flops"], "flop_budget": budget, "steps": records[-1]["step"],
            "flops_per_step": records[-1]["cum_flops"] / records[-1]["step"], "curve": progress.curve,
            "start_nll": progress.curve[0][1], "final_nll": progress.curve[-1][1],
            "final_train_loss": records[-1]["loss"], "train_seconds": sum(r["step_time"] for r in records),
            "median_step_seconds": statistics.median(r["step_time"] for r in records),
            "seconds": seconds, "overrides": list(overrides)}


def static_table(patches_per_image: int, entropies: torch.Tensor, grid_width: int) -> patchify.PatchTable:
    """Static patches (static_patch_lengths), ``patches_per_image`` per item of ``entropies`` [N, T]."""
    lengths, cu = static_patch_lengths(entropies.shape[0], grid_height=entropies.shape[1] // grid_width,
                                       grid_width=grid_width, patches_per_image=patches_per_image)
    return patchify.PatchTable(lengths, cu, entropies, float("nan"), int(lengths.max()), grid_width)


def baseline_step_flops(train_dir: str, settings: dict, overrides: tuple[str, ...] = ()) -> float:
    """Training FLOPs of one baseline step of ``settings``' preset and batch size with MODEL_OVERRIDES and
    ``overrides``, as train_model builds it."""
    dataset = data.TokenGridDataset(train_dir)
    config = ModelConfig(**make_config("baseline", model_size("baseline", settings), dataset,
                                       [*MODEL_OVERRIDES, *overrides]))
    return float(baseline_training_flops(config, settings["batch_size"])["total"])


def plot_curves(runs: list[dict], path: str) -> None:
    """Held-out NLL against training FLOPs: one colour per run name, one line per seed."""
    from .sample import _pyplot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for run in runs:
        label = f"{run['name']} ({run['patching']})"
        first = label not in colours
        colours.setdefault(label, f"C{len(colours)}")
        flops, nll = zip(*run["curve"])
        axis.plot([f / 1e12 for f in flops], nll, marker="o", markersize=3, color=colours[label], alpha=0.8,
                  label=label if first else None)
    axis.set_xlabel("training TFLOPs")
    axis.set_ylabel("held-out NLL (nats / token)")
    axis.set_title("Held-out NLL at equal training FLOPs (one line per seed)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def train_entropy_model(out: str, settings: dict, seed: int) -> str:
    """The entropy model: ``settings["entropy_steps"]`` steps of `dpar train entropy` on out/data/train (a progress
    bar) into out/entropy; returns its checkpoint path."""
    entropy_dir = os.path.join(out, "entropy")
    steps = settings["entropy_steps"]
    with progress.bar(steps, "  entropy model") as entropy_bar:
        def on_step(record: dict, model) -> None:
            entropy_bar.set_postfix_str(f"loss {record['loss']:.3f}", refresh=False)
            entropy_bar.update(1)
        train_model("entropy", os.path.join(out, "data", "train"), entropy_dir, settings, seed, steps=steps,
                    on_step=on_step)
    return os.path.join(entropy_dir, train.CHECKPOINT)


def patch_tables(out: str, entropy_model, target_reduction: float, max_patch_size: int = 4):
    """(threshold, {"train", "val": entropies float32 [N, T]}, {"entropy", "static": (train, val) PatchTables}):
    the entropy threshold for ``target_reduction`` on out/data/train, its patches, and static patches with the same
    global tokens per image."""
    datasets = {split: data.TokenGridDataset(os.path.join(out, "data", split)) for split in ("train", "val")}
    width = datasets["val"].grid_width
    entropies = {split: patchify.dataset_entropies(entropy_model, dataset) for split, dataset in datasets.items()}
    threshold = patchify.threshold_for_reduction(entropies["train"], target_reduction, max_patch_size, width)
    entropy_tables = tuple(patchify.PatchTable.from_entropies(entropies[s], threshold, max_patch_size, width)
                           for s in ("train", "val"))
    per_image = round(entropy_tables[0].patch_lengths.numel() / len(entropy_tables[0]))
    tables = {"entropy": entropy_tables,
              "static": tuple(static_table(per_image, entropies[s], width) for s in ("train", "val"))}
    return threshold, entropies, tables


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tiny models are latency bound, and on a shared "
                             "machine more threads mostly wait for each other)")
