"""`dpar demo`: the whole DPAR pipeline on photographs shipped with scikit-image, on CPU in a few minutes.

Crops of the photos (class = source photo; held-out crops come from held-out regions of each photo and share no
pixel with a training crop, dpar.pipeline.data.leak_free_crops) -> palette tokenizer -> token datasets (train /
held-out) -> entropy model -> patches at a target reduction -> the LlamaGen baseline, DPAR with entropy patches
and DPAR with static patches of the same count, each trained to the same training-FLOP budget (same data order and
seed, a progress line every 25 steps) -> report.md (tokens per image, reduction, FLOPs, steps, time, held-out NLL),
nll_vs_flops.png, sample grids and an entropy / patch map. Every number in the report is computed by this run.
"""
from __future__ import annotations

import argparse
import os

import torch

from . import budget_runs, data, objectives, sample, train
from .builders import load_model

QUICK = dict(train_images=48, val_images=16, image_size=16, grid=4, colors=16, steps=3, entropy_steps=2,
             batch_size=8, samples_per_class=1, lr=1e-3, points=2)
RUNS = (("baseline", "LlamaGen baseline"), ("dpar-entropy", "DPAR, entropy patches"),
        ("dpar-static", "DPAR, static patches"))


def _markdown_table(rows: list[dict]) -> str:
    header = ["model", "global tokens / image", "reduction", "train GFLOPs / step", "steps", "train FLOPs",
              "train time (s)", "held-out NLL (nats/token)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['tokens']:.2f} | {row['reduction']:.3f}x | {row['gflops']:.4f} | "
                     f"{row['steps']} | {row['train_flops']:.3e} | {row['seconds']:.0f} | {row['heldout']:.4f} |")
    return "\n".join(lines)


def run_demo(out: str, settings: dict, seed: int = 0, target_reduction: float = 1.8) -> str:
    """Run the pipeline into ``out``; returns the markdown report (also written to out/report.md)."""
    os.makedirs(out, exist_ok=True)
    tokenizer, entropy_model, _, threshold, entropies, tables = budget_runs.prepare_patches(out, settings, seed,
                                                                                        target_reduction)
    train_dir = os.path.join(out, "data", "train")
    val = data.TokenGridDataset(os.path.join(out, "data", "val"))
    budget = settings["steps"] * budget_runs.baseline_step_flops(train_dir, settings["batch_size"])
    common = (out, settings, seed, budget, train_dir, val)
    runs = [budget_runs.budget_run("baseline", "baseline", "every token", *common),
            budget_runs.budget_run("dpar-entropy", "dpar", "entropy", *common, tables["entropy"]),
            budget_runs.budget_run("dpar-static", "dpar", "static", *common, tables["static"])]
    budget_runs.plot_curves(runs, os.path.join(out, "nll_vs_flops.png"))
    rows = [{"model": label, "tokens": run["heldout_global_tokens_per_image"],
             "reduction": val.tokens_per_image / run["heldout_global_tokens_per_image"],
             "gflops": run["flops_per_step"] / 1e9, "steps": run["steps"], "train_flops": run["train_flops"],
             "seconds": run["seconds"], "heldout": run["final_nll"]} for (_, label), run in zip(RUNS, runs)]
    val_table = tables["entropy"][1]
    for kind, name in (("baseline", "baseline"), ("dpar", "dpar-entropy")):
        model, _ = load_model(os.path.join(out, "runs", name, train.CHECKPOINT), kind)
        _sample_grid(model, kind, entropy_model, threshold, val_table.max_patch_size, tokenizer, val,
                     settings["samples_per_class"], os.path.join(out, f"samples_{kind}.png"), seed)
    val_tokens, _ = objectives.load_batch(val, torch.arange(min(4, len(val))))
    sample.save_patch_map(tokenizer.decode(val_tokens.reshape(-1, val.grid_height, val.grid_width), 64),
                          entropies["val"][:len(val_tokens)], *val_table.batch(torch.arange(len(val_tokens))),
                          val.grid_width, os.path.join(out, "patch_map.png"))
    train_table = tables["entropy"][0]
    report = "\n".join([
        "# DPAR demo", "",
        f"{len(train_table)} training crops of {settings['image_size']}px from {val.num_classes} scikit-image "
        f"photos, {val.grid_height}x{val.grid_width} tokens from a {tokenizer.vocab_size}-colour palette; "
        f"{len(val)} held-out crops from held-out regions of the photos (no pixel shared with a training crop). "
        f"Entropy threshold {threshold:.4f} nats (target reduction {target_reduction}x "
        f"on the training set, got {train_table.reduction:.3f}x), max patch size {train_table.max_patch_size}. "
        f"Static patches: the same global tokens per image, content-independent. Every model trains to the same "
        f"budget of {budget:.3e} training FLOPs ({settings['steps']} baseline steps of batch "
        f"{settings['batch_size']}, lr {settings['lr']}), same data order and seed; held-out NLL at the end "
        f"(curves in nll_vs_flops.png).", "",
        _markdown_table(rows), "",
        "Files: nll_vs_flops.png, samples_dpar.png, samples_baseline.png, patch_map.png (held-out crops), "
        "runs/ (checkpoints, logs), report.md.", ""])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report)
    return report


def _sample_grid(model, kind, entropy_model, threshold, max_patch_size, tokenizer, dataset, per_class, path, seed):
    labels = torch.arange(dataset.num_classes).repeat_interleave(per_class)
    tokens, _, _ = sample.sample_tokens(model, labels, entropy_model=entropy_model, threshold=threshold,
                                        max_patch_size=max_patch_size, seed=seed)
    images = tokenizer.decode(tokens.reshape(-1, dataset.grid_height, dataset.grid_width), 64)
    sample.save_image_grid(images, path, per_class, [f"class {c}" for c in range(dataset.num_classes)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (report.md, PNGs, checkpoints, data)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), for smoke tests")
    parser.add_argument("--steps", type=int, default=300,
                        help="the training-FLOP budget of every model, in baseline steps")
    parser.add_argument("--entropy-steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--val-images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="crop size in pixels")
    parser.add_argument("--grid", type=int, default=16, help="token grid side")
    parser.add_argument("--colors", type=int, default=256, help="palette size (vocabulary)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="AdamW learning rate (the tiny demo models train at 1e-3; the paper's 1e-4 is for B/L/XL)")
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--target-reduction", type=float, default=1.8, help="global token reduction to aim for")
    parser.add_argument("--points", type=int, default=5, help="held-out evaluations along each training run")
    parser.add_argument("--seed", type=int, default=0)
    budget_runs.add_threads_argument(parser)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    names = ("train_images", "val_images", "image_size", "grid", "colors", "steps", "entropy_steps", "batch_size",
             "samples_per_class", "lr", "points")
    settings = dict(QUICK) if args.quick else {name: getattr(args, name) for name in names}
    print(run_demo(args.out, settings, args.seed, args.target_reduction))
