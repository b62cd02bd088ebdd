"""`dpar ablate`: DPAR's claims tested side by side at small scale, every model at the same training-FLOP budget.

On the embedded photographs (dpar.pipeline.data): an entropy model, then (a) the LlamaGen baseline, (b) DPAR with
entropy patches (threshold for ~1.8x fewer global tokens, max patch 4), (c) DPAR with static patches (the same
global tokens per image, dpar_kernels.patching.static_patch_lengths), (d) DPAR with one-token patches (threshold
-inf), and without --quick (h) DPAR with each of the authors' choices (dpar.model.config.AUTHORS_CHOICES). Every run
has the same data order and seed and stops at the first step where its training FLOPs reach the budget; held-out
NLL is measured at ``--points`` budget fractions. Then (e) the token reduction at the same threshold on 16x16 vs
24x24 token crops, (f) the trained DPAR evaluated with max patch sizes 4/6/8 and raised thresholds, (g) the patch
size histogram. Writes ablation.json, nll_vs_flops.png, patch_sizes.png and report.md into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from dpar_kernels.patching import static_patch_lengths

from ..model.config import AUTHORS_CHOICES, ModelConfig
from ..model.flops import baseline_training_flops
from . import data, objectives, patchify, train
from .builders import load_model, make_config
from .tokenizer import PaletteTokenizer

MODEL_OVERRIDES = ("num_heads=2", "num_kv_heads=2")  # the tiny presets with head_dim 32
FULL = dict(train_images=1024, val_images=256, image_size=32, grid=16, colors=256, steps=250, entropy_steps=300,
            batch_size=16, lr=1e-3, points=6, choices=True)
QUICK = dict(train_images=256, val_images=64, image_size=32, grid=16, colors=64, steps=40, entropy_steps=40,
             batch_size=16, lr=1e-3, points=5, choices=False)
AUTHOR_VARIANTS = {"authors-dropout": ("token_dropout", "resid_dropout", "ffn_dropout"),
                   "authors-zero-head": ("zero_init_head",), "authors-rope-half-row": ("patch_rope_split",),
                   "authors-refiner-attention-only": ("refiner_mlp",)}  # config fields set to AUTHORS_CHOICES
EVAL_PATCH_SIZES, EVAL_THRESHOLD_RAISES = (4, 6, 8), (0.0, 1 / 3, 2 / 3)


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


def baseline_step_flops(train_dir: str, batch_size: int) -> float:
    dataset = data.TokenGridDataset(train_dir)
    config = ModelConfig(**make_config("baseline", "tiny", dataset, list(MODEL_OVERRIDES)))
    return float(baseline_training_flops(config, batch_size)["total"])


def resolution_reduction(out: str, tokenizer: PaletteTokenizer, entropy_ckpt: str, threshold: float,
                         max_patch_size: int, settings: dict, seed: int) -> dict:
    """(e): reduction T/P at ``threshold`` on held-out crops tokenized at the base grid and at 1.5x the grid (16x16
    vs 24x24 tokens from 1.5x larger crops, same pixels per token), scored by the base entropy model (its RoPE
    extends to the larger grid) and by an entropy model trained the same way on the larger grid."""
    photos = data.load_embedded_photos()
    grid, result = settings["grid"], {}
    large = grid * 3 // 2
    images, labels = data.random_crops(photos, settings["train_images"] + settings["val_images"],
                                       settings["image_size"] * 3 // 2, seed)
    large_tokenizer = PaletteTokenizer(tokenizer.palette, large)
    codes = large_tokenizer.encode(images)
    count = settings["train_images"]
    large_dir = os.path.join(out, "data_large")
    for split, part in (("train", slice(0, count)), ("val", slice(count, None))):
        data.write_token_dataset(os.path.join(large_dir, split), codes[part], labels[part], tokenizer.vocab_size,
                                 len(photos))
    base_model, info = load_model(entropy_ckpt, "entropy")
    stretched, _ = load_model(entropy_ckpt, "entropy")
    stretched.config = dataclasses.replace(base_model.config, grid_height=large, grid_width=large)
    large_ckpt = os.path.join(out, "entropy_large")
    print(f"training the entropy model on {large}x{large} tokens", flush=True)
    train_model("entropy", os.path.join(large_dir, "train"), large_ckpt, settings, seed,
                steps=settings["entropy_steps"])
    own_model, _ = load_model(os.path.join(large_ckpt, train.CHECKPOINT), "entropy")
    base_val = data.TokenGridDataset(os.path.join(out, "data", "val"))
    large_val = data.TokenGridDataset(os.path.join(large_dir, "val"))
    for label, model, dataset in ((f"{grid}x{grid}", base_model, base_val),
                                  (f"{large}x{large} (entropy model of {grid}x{grid})", stretched, large_val),
                                  (f"{large}x{large} (own entropy model)", own_model, large_val)):
        entropies = patchify.dataset_entropies(model, dataset)
        table = patchify.PatchTable.from_entropies(entropies, threshold, max_patch_size, dataset.grid_width)
        result[label] = {"tokens_per_image": dataset.tokens_per_image,
                         "patches_per_image": table.patch_lengths.numel() / len(table),
                         "reduction": table.reduction, "mean_entropy": float(entropies.mean())}
    return result


def patch_size_tolerance(run_dir: str, val, val_entropies: torch.Tensor, threshold: float, batch_size: int) -> list:
    """(f): held-out NLL and global steps per image of the trained entropy-patch DPAR at other max patch sizes and
    raised thresholds (patches cut on the held-out set). A raise r moves the threshold from its entropy quantile q
    to the quantile q + r (1 - q): r = 1/3 removes a third of the cuts the trained threshold makes."""
    model, _ = load_model(os.path.join(run_dir, train.CHECKPOINT), "dpar")
    values = val_entropies.reshape(-1).double()
    below = float((values <= threshold).double().mean())
    rows = []
    for raise_ in EVAL_THRESHOLD_RAISES:
        raised = threshold if raise_ == 0 else float(values.quantile(below + raise_ * (1 - below)))
        for size in EVAL_PATCH_SIZES:
            table = patchify.PatchTable.from_entropies(val_entropies, raised, size, val.grid_width)
            nll = _nll_function(val, table, batch_size)(model)
            rows.append({"threshold": raised, "threshold_raise": raise_, "max_patch_size": size,
                         "global_steps_per_image": table.patch_lengths.numel() / len(table),
                         "reduction": table.reduction, "heldout_nll": nll})
    return rows


def patch_histogram(tables: dict) -> dict:
    """(g): {name: {length: share of patches}} of the training patch tables."""
    return {name: {int(length): count / table.patch_lengths.numel()
                   for length, count in enumerate(torch.bincount(table.patch_lengths.long()).tolist()) if count}
            for name, table in tables.items()}


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


def plot_histogram(histogram: dict, path: str) -> None:
    from .sample import _pyplot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    names = list(histogram)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        lengths = sorted(histogram[name])
        axis.bar([n + (i - (len(names) - 1) / 2) * width for n in lengths], [histogram[name][n] for n in lengths],
                 width, label=name)
    axis.set_xlabel("patch length (tokens)")
    axis.set_ylabel("share of patches")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def runs_table(runs: list[dict]) -> str:
    """Markdown table of budget runs."""
    header = ["run", "patching", "global tokens / image", "train FLOPs", "steps", "held-out NLL", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        lines.append(f"| {run['name']} | {run['patching']} | {run['global_tokens_per_image']:.2f} | "
                     f"{run['train_flops']:.3e} | {run['steps']} | {run['final_nll']:.4f} | {run['seconds']:.0f} |")
    return "\n".join(lines)


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


def run_ablation(out: str, settings: dict, seed: int = 0, target_reduction: float = 1.8) -> dict:
    """All of the ablation into ``out``; returns the ablation.json content."""
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    tokenizer, _, entropy_ckpt, threshold, entropies, tables = prepare_patches(out, settings, seed, target_reduction)
    train_dir = os.path.join(out, "data", "train")
    val = data.TokenGridDataset(os.path.join(out, "data", "val"))
    budget = settings["steps"] * baseline_step_flops(train_dir, settings["batch_size"])
    common = (out, settings, seed, budget, train_dir, val)
    runs = [budget_run("baseline", "baseline", "every token (LlamaGen)", *common),
            budget_run("dpar-entropy", "dpar", f"entropy, threshold {threshold:.3f}, max 4", *common,
                       tables["entropy"]),
            budget_run("dpar-static", "dpar", "static, same tokens / image", *common, tables["static"]),
            budget_run("dpar-one-token", "dpar", "one token per patch (threshold -inf)", *common,
                       tables["one-token"])]
    if settings["choices"]:
        for name, keys in AUTHOR_VARIANTS.items():
            overrides = tuple(f"{k}={int(v) if isinstance(v, bool) else v}"
                              for k, v in AUTHORS_CHOICES.items() if k in keys)
            runs.append(budget_run(name, "dpar", "entropy, " + " ".join(overrides), *common, tables["entropy"],
                                   overrides))
    resolution = resolution_reduction(out, tokenizer, entropy_ckpt, threshold, 4, settings, seed)
    tolerance = patch_size_tolerance(os.path.join(out, "runs", "dpar-entropy"), val, entropies["val"], threshold,
                                     settings["batch_size"])
    histogram = patch_histogram({name: pair[0] for name, pair in tables.items() if name != "one-token"})
    result = {"settings": settings, "seed": seed, "target_reduction": target_reduction, "threshold": threshold,
              "train_reduction": tables["entropy"][0].reduction, "flop_budget": budget, "runs": runs,
              "resolution_reduction": resolution, "patch_size_tolerance": tolerance,
              "patch_size_histogram": histogram, "seconds": time.perf_counter() - started,
              "torch_threads": torch.get_num_threads()}
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_curves(runs, os.path.join(out, "nll_vs_flops.png"))
    plot_histogram(histogram, os.path.join(out, "patch_sizes.png"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(result))
    return result


def report(result: dict) -> str:
    """Markdown summary of ablation.json."""
    lines = ["# DPAR ablation at equal training FLOPs", "",
             f"Budget {result['flop_budget']:.3e} training FLOPs per run ({result['settings']['steps']} baseline "
             f"steps of batch {result['settings']['batch_size']}); entropy threshold {result['threshold']:.4f} nats "
             f"(train reduction {result['train_reduction']:.3f}x); same data order and seed for every run.", "",
             runs_table(result["runs"]), "", "Token reduction at the same threshold (e):", "",
             "| crops | tokens / image | patches / image | reduction |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['tokens_per_image']} | {v['patches_per_image']:.2f} | {v['reduction']:.3f}x |"
              for k, v in result["resolution_reduction"].items()]
    lines += ["", "Trained entropy-patch DPAR at other patch sizes and thresholds (f):", "",
              "| threshold | max patch | global steps / image | held-out NLL |", "|---|---|---|---|"]
    lines += [f"| {r['threshold']:.3f} (raise {r['threshold_raise']:.2f}) | {r['max_patch_size']} | "
              f"{r['global_steps_per_image']:.2f} | {r['heldout_nll']:.4f} |" for r in result["patch_size_tolerance"]]
    lines += ["", "Patch sizes (g), share of training patches: " + "; ".join(
        f"{name}: " + ", ".join(f"{n}: {share:.2f}" for n, share in sorted(h.items()))
        for name, h in result["patch_size_histogram"].items()),
        "", "Files: ablation.json, nll_vs_flops.png, patch_sizes.png.", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (ablation.json, nll_vs_flops.png, runs/)")
    parser.add_argument("--quick", action="store_true", help="small settings: under 3 minutes on 2 cores")
    parser.add_argument("--steps", type=int, help="FLOP budget in baseline steps (default: 250, quick 40)")
    parser.add_argument("--entropy-steps", type=int)
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--val-images", type=int)
    parser.add_argument("--points", type=int, help="held-out evaluations along each run (>= 5 by default)")
    parser.add_argument("--no-choices", action="store_true", help="skip the runs with the authors' choices")
    parser.add_argument("--target-reduction", type=float, default=1.8)
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the tiny models are latency bound, and on a shared "
                             "machine more threads mostly wait for each other)")


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for name in ("steps", "entropy_steps", "train_images", "val_images", "points"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.no_choices:
        settings["choices"] = False
    result = run_ablation(args.out, settings, args.seed, args.target_reduction)
    print(report(result))
    print(f"{result['seconds']:.0f}s -> {args.out}")
