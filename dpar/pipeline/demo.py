"""`dpar demo`: the whole DPAR pipeline on photographs shipped with scikit-image, on CPU in a few minutes.

Crops of the photos (class = source photo; held-out crops come from held-out regions of each photo and share no
pixel with a training crop, dpar.pipeline.data.leak_free_crops) -> palette tokenizer -> token datasets (train /
held-out) -> entropy model -> patches at a target reduction -> the LlamaGen baseline, DPAR with entropy patches
and DPAR with static patches of the same count, each trained to the same training-FLOP budget on paired seeds (seed
k: the same initialisation seed and data order in every arm) -> report.md and demo.json: per arm tokens per image,
FLOPs, steps, train time and its ratio to the baseline beside the FLOP ratio, held-out NLL before and after training
(mean and 95% t interval over the seeds), the paired differences between arms, each phase's time and the machine;
nll_vs_flops.png, sample grids and an entropy / patch map. A short calibration first estimates the whole run; every
long phase shows a progress bar. Every number in the report is computed by this run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch

import dpar_kernels as dk

from ..model.config import EntropyConfig, ModelConfig
from . import ablate, budget_runs, data, intervals, objectives, sample, train
from .builders import build_model, load_model, make_config
from .progress import PhaseClock

# the default is sized to about five minutes on a 2-core AVX2 CPU: a global-heavy DPAR (1/8/1 layers) on 8x8 tokens
DEFAULT = dict(train_images=2048, val_images=256, image_size=16, grid=8, colors=256, size="tiny-global", steps=120,
               entropy_steps=200, batch_size=16, lr=2e-3, samples_per_class=2, points=4, seeds=3)
FULL = dict(train_images=512, val_images=128, image_size=32, grid=16, colors=256, size="tiny", steps=300,
            entropy_steps=300, batch_size=16, lr=1e-3, samples_per_class=4, points=5, seeds=1)
QUICK = dict(train_images=48, val_images=16, image_size=16, grid=4, colors=16, size="tiny", steps=3, entropy_steps=2,
             batch_size=8, samples_per_class=1, lr=1e-3, points=2, seeds=2)
ARMS = (("baseline", "baseline", "every token", "LlamaGen baseline"),
        ("dpar-entropy", "dpar", "entropy", "DPAR, entropy patches"),
        ("dpar-static", "dpar", "static", "DPAR, static patches"))
COMPARISONS = (("dpar-entropy", "baseline", "DPAR with entropy patches beats the baseline at equal training FLOPs"),
               ("dpar-static", "baseline", "DPAR with static patches beats the baseline at equal training FLOPs"),
               ("dpar-entropy", "dpar-static", "entropy patches beat static patches with the same tokens per image"))
CALIBRATION_STEPS = 5  # timed optimizer steps per model, after one untimed


def machine() -> dict:
    """ablate.machine() (CPU, cores, torch threads, load) plus the ISA path of the C++ CPU kernels."""
    return {**ablate.machine(), "isa": dk.cpu_isa()}


def _median_step_seconds(kind: str, config, train_set: ablate.TokenSet, table, settings: dict) -> float:
    """Median wall seconds of one optimizer step of a fresh ``kind`` model (batch and lr of ``settings``)."""
    torch.manual_seed(0)
    model = build_model(kind, dataclasses.asdict(config))
    optimizer = train.make_optimizer(model, settings["lr"], (0.9, 0.95), 0.05)
    loss_module = objectives.LossModule(model, train_set.grid_width)
    times = []
    for step in range(CALIBRATION_STEPS + 1):
        started = time.perf_counter()
        indices = train.batch_indices(step, settings["batch_size"], len(train_set), 0)
        if kind == "entropy":
            loss = model.loss(train_set.tokens[indices])
        else:
            patches = None if table is None else loss_module.patch_batch(table.batch(indices), "cpu")
            loss = loss_module(train_set.tokens[indices], train_set.labels[indices], patches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[CALIBRATION_STEPS // 2]


def calibrate(out: str, settings: dict, budget: float, target_reduction: float) -> dict:
    """Estimated seconds of the entropy model and of each arm's run (per seed), from a few timed steps of fresh
    models (DPAR on static patches of the target reduction) and one held-out evaluation each."""
    train_root, val_root = os.path.join(out, "data", "train"), os.path.join(out, "data", "val")
    train_set, val = ablate.TokenSet.load(train_root), data.TokenGridDataset(val_root)
    dataset = data.TokenGridDataset(train_root)
    per_image = max(1, round(val.tokens_per_image / target_reduction))
    tables = {split: budget_runs.static_table(per_image, torch.zeros(size, val.tokens_per_image), val.grid_width)
              for split, size in (("train", len(train_set)), ("val", len(val)))}
    entropy_config = EntropyConfig(**make_config("entropy", "tiny", dataset, list(budget_runs.MODEL_OVERRIDES)))
    estimate = {"entropy model": settings["entropy_steps"] * _median_step_seconds("entropy", entropy_config,
                                                                                  train_set, None, settings)}
    for kind in ("baseline", "dpar"):
        config = ModelConfig(**make_config(kind, budget_runs.model_size(kind, settings), dataset,
                                           list(budget_runs.MODEL_OVERRIDES)))
        train_table, val_table = (None, None) if kind == "baseline" else (tables["train"], tables["val"])
        step_seconds = _median_step_seconds(kind, config, train_set, train_table, settings)
        steps = math.ceil(budget / ablate.step_flops(kind, config, train_table,
                                                     torch.arange(settings["batch_size"])))
        torch.manual_seed(0)
        evaluate = budget_runs.nll_function(val, val_table, settings["batch_size"])
        started = time.perf_counter()
        evaluate(build_model(kind, dataclasses.asdict(config)))
        estimate[kind] = steps * step_seconds + (settings["points"] + 1) * (time.perf_counter() - started)
    return estimate


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def summarise(runs: list[dict], seeds: list[int]) -> tuple[dict, dict]:
    """({arm: per-arm figures over the seeds}, {"first - second": paired difference of final held-out NLL}).

    Time and FLOP ratios are to the baseline of the same seed, averaged over the seeds. A time ratio compares runs
    at their median step time (times their steps): a stall of a shared machine during a few steps does not count;
    "train_seconds" is the measured sum. With two seeds or more the NLLs carry 95% t intervals
    (dpar.pipeline.intervals)."""
    by = {(r["name"].rsplit("/", 1)[0], r["seed"]): r for r in runs}
    arms = {}
    for name, _, _, label in ARMS:
        own = [by[name, s] for s in seeds]
        base = [by["baseline", s] for s in seeds]
        figures = {"label": label, "patching": own[0]["patching"],
                   "global_tokens_per_image": own[0]["heldout_global_tokens_per_image"],
                   "steps": [r["steps"] for r in own], "flops_per_step": _mean(r["flops_per_step"] for r in own),
                   "train_flops": _mean(r["train_flops"] for r in own),
                   "train_seconds": _mean(r["train_seconds"] for r in own),
                   "time_ratio": _mean(r["median_step_seconds"] * r["steps"] / (b["median_step_seconds"] * b["steps"])
                                       for r, b in zip(own, base)),
                   "flop_ratio": _mean(r["train_flops"] / b["train_flops"] for r, b in zip(own, base)),
                   "step_time_ratio": _mean(r["median_step_seconds"] / b["median_step_seconds"]
                                            for r, b in zip(own, base)),
                   "step_flop_ratio": _mean(r["flops_per_step"] / b["flops_per_step"] for r, b in zip(own, base)),
                   "start_nll": [r["start_nll"] for r in own], "final_nll": [r["final_nll"] for r in own]}
        if len(seeds) >= 2:
            figures["final_nll_interval"] = intervals.mean_interval(figures["final_nll"])
        arms[name] = figures
    differences = {}
    if len(seeds) >= 2:
        for first, second, claim in COMPARISONS:
            diff = intervals.paired_difference(arms[first]["final_nll"], arms[second]["final_nll"])
            diff["claim"] = claim
            diff["sentence"] = ablate.claim_sentence(f"{first} - {second}", claim, diff)
            differences[f"{first} - {second}"] = diff
    return arms, differences


def _nll_cell(figures: dict) -> str:
    if "final_nll_interval" in figures:
        stats = figures["final_nll_interval"]
        return f"{stats['mean']:.4f} [{stats['low']:.4f}, {stats['high']:.4f}]"
    return " / ".join(f"{v:.4f}" for v in figures["final_nll"])


def _markdown_table(arms: dict, tokens_per_image: int) -> str:
    header = ["model", "global tokens / image", "reduction", "train GFLOPs / step", "steps", "train FLOPs",
              "train time (s)", "time / baseline", "FLOPs / baseline", "time per step / baseline",
              "FLOPs per step / baseline", "held-out NLL untrained", "held-out NLL trained, mean [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for figures in arms.values():
        start = sum(figures["start_nll"]) / len(figures["start_nll"])
        lines.append(
            f"| {figures['label']} | {figures['global_tokens_per_image']:.2f} | "
            f"{tokens_per_image / figures['global_tokens_per_image']:.3f}x | {figures['flops_per_step'] / 1e9:.4f} | "
            f"{'/'.join(map(str, sorted(set(figures['steps']))))} | {figures['train_flops']:.3e} | "
            f"{figures['train_seconds']:.1f} | {figures['time_ratio']:.3f}x | {figures['flop_ratio']:.3f}x | "
            f"{figures['step_time_ratio']:.3f}x | {figures['step_flop_ratio']:.3f}x | {start:.4f} | "
            f"{_nll_cell(figures)} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    """Markdown summary of demo.json."""
    s, m = result["settings"], result["machine"]
    lines = [
        "# DPAR demo", "",
        f"{result['split']['train_crops']} training crops of {s['image_size']}px from {len(result['split']['photos'])} "
        f"scikit-image photos, {s['grid']}x{s['grid']} tokens from a {result['vocab_size']}-colour palette; "
        f"{result['split']['heldout_crops']} held-out crops from held-out regions of the photos "
        f"({result['split']['heldout_crops_overlapping_training']} share a pixel with a training crop). "
        f"Models: preset {s['size']} ({result['layers']} encoder/global/decoder layers, width {result['width']}). "
        f"Entropy threshold {result['threshold']:.4f} nats (target reduction {result['target_reduction']}x on the "
        f"training set, got {result['train_reduction']:.3f}x), max patch size {result['max_patch_size']}. "
        f"Static patches: the same global tokens per image, content-independent. Every model trains to the same "
        f"budget of {result['flop_budget']:.3e} training FLOPs ({s['steps']} baseline steps of batch "
        f"{s['batch_size']}, constant lr {s['lr']}) on seeds {result['seeds']} (each seed: the same initialisation "
        f"seed and data order in every arm); held-out NLL of the untrained model and at the end (curves in "
        f"nll_vs_flops.png). Train time: the optimizer steps' own time (no evaluation), mean over the seeds; time "
        f"ratios: to the baseline of the same seed at each run's median step time (robust to a stall of a shared "
        f"machine), mean over the seeds.", "",
        _markdown_table(result["arms"], result["tokens_per_image"]), ""]
    if result["differences"]:
        lines += ["Paired differences of the final held-out NLL (negative: the first is better), mean [95% t "
                  f"interval] over {len(result['seeds'])} seeds:", ""]
        lines += [f"- {diff['sentence']}" for diff in result["differences"].values()]
    else:
        lines += ["One seed: no intervals (`--seeds 2` or more for paired differences with 95% intervals)."]
    phases = result["phases"]
    lines += ["", "Phases (wall seconds): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())
              + f"; total {result['seconds']:.1f} s (estimated at the start: {result['estimate']['total']:.0f} s).",
              "", f"Machine: {m['cpu']}, {m['cores']} cores, ISA path {m['isa']}, {m['torch_threads']} torch "
              f"thread(s), torch {m['torch']}; load average {m['load_average']} at the start, "
              f"{m.get('load_average_end')} at the end.", "",
              "Files: nll_vs_flops.png, samples_dpar.png, samples_baseline.png, patch_map.png (held-out crops), "
              "demo.json, runs/ARM/seedK (checkpoints, logs), report.md.", ""]
    return "\n".join(lines)


def run_demo(out: str, settings: dict, target_reduction: float = 1.8, max_patch_size: int = 4) -> dict:
    """Run the pipeline into ``out``; returns the demo.json content (report.md holds report(result))."""
    clock = PhaseClock()
    os.makedirs(out, exist_ok=True)
    result = {"settings": dict(settings), "machine": machine(), "target_reduction": target_reduction,
              "max_patch_size": max_patch_size, "seeds": list(range(settings["seeds"]))}
    m = result["machine"]
    print(f"dpar demo on {m['cpu']}, {m['cores']} cores, ISA path {m['isa']}, {m['torch_threads']} torch threads",
          flush=True)
    with clock.phase("data"):
        tokenizer = budget_runs.prepare_data(out, settings, seed=0)
    train_root = os.path.join(out, "data", "train")
    val = data.TokenGridDataset(os.path.join(out, "data", "val"))
    budget = settings["steps"] * budget_runs.baseline_step_flops(train_root, settings)
    with clock.phase("calibration"):
        estimate = calibrate(out, settings, budget, target_reduction)
    estimate["total"] = (clock.elapsed() + estimate["entropy model"]
                         + len(result["seeds"]) * (estimate["baseline"] + 2 * estimate["dpar"]))
    result["estimate"] = estimate
    print(f"estimated run time on this machine: about {estimate['total'] / 60:.1f} min (entropy model "
          f"{estimate['entropy model']:.0f} s; per seed: baseline {estimate['baseline']:.0f} s, each DPAR arm "
          f"{estimate['dpar']:.0f} s; {len(result['seeds'])} seeds; sampling and plots not included), from a "
          f"{clock.seconds['calibration']:.0f} s calibration", flush=True)
    print(f"training the entropy model ({settings['entropy_steps']} steps)", flush=True)
    with clock.phase("entropy model"):
        entropy_model, _ = load_model(budget_runs.train_entropy_model(out, settings, seed=0), "entropy")
    with clock.phase("patches"):
        threshold, entropies, tables = budget_runs.patch_tables(out, entropy_model, target_reduction, max_patch_size)
    runs = []
    for seed in result["seeds"]:
        for name, kind, patching, _ in ARMS:
            print(f"training {name} ({patching}), seed {seed}, to {budget:.3e} FLOPs", flush=True)
            with clock.phase(f"train {name}"):
                runs.append(budget_runs.budget_run(f"{name}/seed{seed}", kind, patching, out, settings, seed, budget,
                                                   train_root, val, tables.get(patching)))
    with clock.phase("samples and plots"):
        budget_runs.plot_curves(runs, os.path.join(out, "nll_vs_flops.png"))
        _samples_and_patch_map(out, settings, entropy_model, threshold, entropies, tables["entropy"][1],
                               max_patch_size, tokenizer, val)
    arms, differences = summarise(runs, result["seeds"])
    config = ModelConfig(**make_config("dpar", settings["size"], val, list(budget_runs.MODEL_OVERRIDES)))
    train_table = tables["entropy"][0]
    with open(os.path.join(out, "data", "split.json")) as f:
        split = json.load(f)
    result.update(
        split=split, vocab_size=tokenizer.vocab_size, tokens_per_image=val.tokens_per_image,
        layers=f"{config.encoder_layers}/{config.global_layers}/{config.decoder_layers}", width=config.width,
        threshold=threshold, train_reduction=train_table.reduction, heldout_reduction=tables["entropy"][1].reduction,
        flop_budget=budget, runs=runs, arms=arms, differences=differences, phases=clock.seconds,
        seconds=clock.elapsed())
    result["machine"]["load_average_end"] = machine()["load_average"]
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(result))
    return result


def _samples_and_patch_map(out, settings, entropy_model, threshold, entropies, val_table, max_patch_size, tokenizer,
                           val) -> None:
    """Sample grids of the seed-0 baseline and DPAR-entropy models; the entropy / patch map of 4 held-out crops."""
    for kind, name in (("baseline", "baseline"), ("dpar", "dpar-entropy")):
        model, _ = load_model(os.path.join(out, "runs", name, "seed0", train.CHECKPOINT), kind)
        labels = torch.arange(val.num_classes).repeat_interleave(settings["samples_per_class"])
        tokens, _, _ = sample.sample_tokens(model, labels, entropy_model=entropy_model, threshold=threshold,
                                            max_patch_size=max_patch_size, seed=0)
        images = tokenizer.decode(tokens.reshape(-1, val.grid_height, val.grid_width), 64)
        sample.save_image_grid(images, os.path.join(out, f"samples_{kind}.png"), settings["samples_per_class"],
                               [f"class {c}" for c in range(val.num_classes)])
    val_tokens, _ = val.batch(torch.arange(min(4, len(val))))
    sample.save_patch_map(tokenizer.decode(val_tokens.reshape(-1, val.grid_height, val.grid_width), 64),
                          entropies["val"][:len(val_tokens)], *val_table.batch(torch.arange(len(val_tokens))),
                          val.grid_width, os.path.join(out, "patch_map.png"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (report.md, demo.json, PNGs, checkpoints, data)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="tiny settings (seconds), for smoke tests")
    sizes.add_argument("--full", action="store_true",
                       help="the earlier, larger demo: 512 crops of 32 px, 16x16 tokens, 1/2/1 layers, 300 steps, one "
                            "seed (tens of minutes on 2 cores)")
    parser.add_argument("--steps", type=int, help="the training-FLOP budget of every model, in baseline steps")
    parser.add_argument("--seeds", type=int, help="paired seeds 0..N-1 of every arm (2 or more: 95%% intervals)")
    parser.add_argument("--entropy-steps", type=int)
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--val-images", type=int)
    parser.add_argument("--image-size", type=int, help="crop size in pixels")
    parser.add_argument("--grid", type=int, help="token grid side")
    parser.add_argument("--colors", type=int, help="palette size (vocabulary)")
    parser.add_argument("--size", help="model preset of the baseline and DPAR (tiny, tiny-global)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float,
                        help="AdamW learning rate (the tiny demo models train at 1e-3 to 2e-3; the paper's 1e-4 is "
                             "for B/L/XL)")
    parser.add_argument("--samples-per-class", type=int)
    parser.add_argument("--points", type=int, help="held-out evaluations along each training run")
    parser.add_argument("--target-reduction", type=float, default=1.8, help="global token reduction to aim for")
    parser.add_argument("--threads", type=int,
                        help=f"torch intra-op threads (default: torch's own, {torch.get_num_threads()} here)")


def main(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL if args.full else DEFAULT)
    for name in settings:
        if getattr(args, name, None) is not None:
            settings[name] = getattr(args, name)
    if settings["seeds"] < 1:
        raise ValueError(f"--seeds must be at least 1, got {settings['seeds']}")
    result = run_demo(args.out, settings, args.target_reduction)
    print(report(result))
    print(f"{result['seconds']:.0f}s -> {args.out}")
