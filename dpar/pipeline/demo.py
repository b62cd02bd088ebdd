"""`dpar demo`: the whole DPAR pipeline on photographs shipped with scikit-image, on CPU in a few minutes.

Random crops of the photos (class = source photo) -> palette tokenizer -> token datasets (train / held-out) ->
entropy model -> patches at a target reduction -> DPAR and the LlamaGen baseline (same data, steps, seed) ->
report.md (tokens per image, reduction, training FLOPs per step, measured step time, held-out loss), sample grids
and an entropy / patch map. Every number in the report is computed by this run.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from . import data, evaluate, objectives, patchify, sample, train
from .builders import load_model
from .tokenizer import PaletteTokenizer

MODEL_OVERRIDES = ("num_heads=2", "num_kv_heads=2")  # the tiny presets with head_dim 32
QUICK = dict(train_images=48, val_images=16, image_size=16, grid=4, colors=16, steps=2, entropy_steps=2,
             batch_size=8, samples_per_class=1, lr=1e-3)


def _train(kind: str, data_dir: str, out: str, steps: int, batch_size: int, seed: int, lr: float,
           extra: list[str]):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = [kind, "--data", data_dir, "--out", out, "--steps", str(steps), "--batch-size", str(batch_size),
            "--seed", str(seed), "--lr", str(lr), "--quiet", "--device", "cpu", "--override", *MODEL_OVERRIDES, *extra]
    return train.train(parser.parse_args(argv))


def _median_step_time(records: list[dict]) -> float:
    times = [r["step_time"] for r in records[1:]] or [r["step_time"] for r in records]
    return statistics.median(times)


def _markdown_table(rows: list[dict]) -> str:
    header = ["model", "global tokens / image", "reduction", "train GFLOPs / step", "step time (s)",
              "held-out NLL (nats/token)", "final train loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['tokens']:.2f} | {row['reduction']:.3f}x | {row['gflops']:.4f} | "
                     f"{row['step_time']:.4f} | {row['heldout']:.4f} | {row['train_loss']:.4f} |")
    return "\n".join(lines)


def prepare_data(out: str, settings: dict, seed: int) -> PaletteTokenizer:
    """Crops -> fitted tokenizer (out/tokenizer.safetensors) -> out/data/{train,val} token datasets."""
    photos = data.load_embedded_photos()
    images, labels = data.random_crops(photos, settings["train_images"] + settings["val_images"],
                                       settings["image_size"], seed)
    count = settings["train_images"]
    tokenizer = PaletteTokenizer.fit(images[:count], settings["colors"], settings["grid"], seed=seed)
    tokenizer.save(os.path.join(out, "tokenizer.safetensors"))
    codes = tokenizer.encode(images)
    for split, part in (("train", slice(0, count)), ("val", slice(count, None))):
        data.write_token_dataset(os.path.join(out, "data", split), codes[part], labels[part],
                                 tokenizer.vocab_size, len(photos))
    return tokenizer


def run_demo(out: str, settings: dict, seed: int = 0, target_reduction: float = 1.8) -> str:
    """Run the pipeline into ``out``; returns the markdown report (also written to out/report.md)."""
    os.makedirs(out, exist_ok=True)
    tokenizer = prepare_data(out, settings, seed)
    train_dir, val_dir = os.path.join(out, "data", "train"), os.path.join(out, "data", "val")
    steps, batch = settings["steps"], settings["batch_size"]
    entropy_dir = os.path.join(out, "entropy")
    _train("entropy", train_dir, entropy_dir, settings["entropy_steps"], batch, seed, settings["lr"], [])
    entropy_ckpt = os.path.join(entropy_dir, train.CHECKPOINT)
    patches_path = os.path.join(out, "patches.pt")
    table = patchify.patchify(train_dir, entropy_ckpt, patches_path, target_reduction=target_reduction)
    lr = settings["lr"]
    logs = {"dpar": _train("dpar", train_dir, os.path.join(out, "dpar"), steps, batch, seed, lr,
                           ["--patches", patches_path]),
            "baseline": _train("baseline", train_dir, os.path.join(out, "baseline"), steps, batch, seed, lr, [])}

    val = data.TokenGridDataset(val_dir)
    entropy_model, _ = load_model(entropy_ckpt, "entropy")
    val_entropies = patchify.dataset_entropies(entropy_model, val)
    val_table = patchify.PatchTable.from_entropies(val_entropies, table.threshold, table.max_patch_size,
                                                   val.grid_width)
    val_stats = evaluate.patch_statistics(val_table.patch_lengths, val_table.cu_patches, val.tokens_per_image)
    rows = []
    for kind in ("baseline", "dpar"):
        model, _ = load_model(os.path.join(out, kind, train.CHECKPOINT), kind)
        source = objectives.PatchSource(table=val_table) if kind == "dpar" else None
        heldout = objectives.heldout_loss(objectives.LossModule(kind, model, val.grid_width), val, source, batch)
        records = logs[kind]
        tokens = val_stats["patches_per_image"] if kind == "dpar" else float(val.tokens_per_image)
        rows.append({"model": "DPAR" if kind == "dpar" else "LlamaGen baseline", "tokens": tokens,
                     "reduction": val.tokens_per_image / tokens,
                     "gflops": statistics.mean(r["flops"] for r in records) / 1e9,
                     "step_time": _median_step_time(records), "heldout": heldout, "train_loss": records[-1]["loss"]})
        _sample_grid(model, kind, entropy_model, table.threshold, table.max_patch_size, tokenizer, val,
                     settings["samples_per_class"], os.path.join(out, f"samples_{kind}.png"), seed)
    val_tokens, _ = objectives.load_batch(val, torch.arange(min(4, len(val))))
    sample.save_patch_map(tokenizer.decode(val_tokens.reshape(-1, val.grid_height, val.grid_width), 64),
                          val_entropies[:len(val_tokens)], *val_table.batch(torch.arange(len(val_tokens))),
                          val.grid_width, os.path.join(out, "patch_map.png"))
    report = "\n".join([
        "# DPAR demo", "",
        f"{len(table)} training crops of {settings['image_size']}px from {val.num_classes} scikit-image photos, "
        f"{val.grid_height}x{val.grid_width} tokens from a {tokenizer.vocab_size}-colour palette; {len(val)} "
        f"held-out crops. Entropy threshold {table.threshold:.4f} nats (target reduction {target_reduction}x on "
        f"the training set, got {table.reduction:.3f}x), max patch size {table.max_patch_size}. DPAR and the "
        f"baseline: {steps} steps of batch {batch} at learning rate {lr}, same data order and seed.", "",
        _markdown_table(rows), "",
        "Files: samples_dpar.png, samples_baseline.png, patch_map.png (held-out crops), report.md.", ""])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    return report


def _sample_grid(model, kind, entropy_model, threshold, max_patch_size, tokenizer, dataset, per_class, path, seed):
    labels = torch.arange(dataset.num_classes).repeat_interleave(per_class)
    tokens, _, _ = sample.sample_tokens(model, kind, labels, entropy_model=entropy_model, threshold=threshold,
                                        max_patch_size=max_patch_size, seed=seed)
    images = tokenizer.decode(tokens.reshape(-1, dataset.grid_height, dataset.grid_width), 64)
    sample.save_image_grid(images, path, per_class, [f"class {c}" for c in range(dataset.num_classes)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (report.md, PNGs, checkpoints, data)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), for smoke tests")
    parser.add_argument("--steps", type=int, default=600, help="training steps of DPAR and the baseline")
    parser.add_argument("--entropy-steps", type=int, default=400)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--val-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32, help="crop size in pixels")
    parser.add_argument("--grid", type=int, default=16, help="token grid side")
    parser.add_argument("--colors", type=int, default=256, help="palette size (vocabulary)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="AdamW learning rate (the tiny demo models train at 1e-3; the paper's 1e-4 is for B/L/XL)")
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--target-reduction", type=float, default=1.8, help="global token reduction to aim for")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> None:
    names = ("train_images", "val_images", "image_size", "grid", "colors", "steps", "entropy_steps", "batch_size",
             "samples_per_class", "lr")
    settings = dict(QUICK) if args.quick else {name: getattr(args, name) for name in names}
    print(run_demo(args.out, settings, args.seed, args.target_reduction))
