"""`dpar ablate`: DPAR's claims at one training-FLOP budget, over paired seeds, with 95% intervals.

Data: crops of every photo scikit-image ships offline, held-out crops cut from held-out regions only (no pixel shared
with a training crop; dpar.pipeline.data.leak_free_crops), a palette tokenizer fitted on the training crops.
An entropy model is trained once (warmup + cosine, to near convergence) and shared; its training and inference
FLOPs are reported apart from the generators'. Arms, every one stopped at the first step where its training FLOPs
reach the budget (``budget_steps`` steps of the baseline), with warmup + cosine over its own step count:

- baseline: the LlamaGen baseline with DPAR's total depth;
- shallow-baseline: a baseline whose FLOPs per step match DPAR's, so it gets DPAR's step count;
- dpar-entropy: DPAR (global-heavy preset) on entropy patches (threshold for ``target_reduction``, max patch 4);
- dpar-static: DPAR on static patches with the same global tokens per image;
- dpar-shuffled: DPAR on each row's entropy patch lengths in a random order (same size histogram, blind to content).

Each seed sets the initialisation and the data order, the same for every arm (paired). Reported per arm: final
held-out NLL (mean and 95% t interval over seeds), NLL after the baseline's step count, NLL per entropy bin; and the
paired differences of CLAIMS with their intervals. Writes ablation.json, report.md, nll_by_arm.png and
patch_sizes.png into --out (ablation.json after every seed, so a cut-short run keeps what it finished).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..model import flops as model_flops
from ..model.config import EntropyConfig, ModelConfig
from ..model.patcher import PatchBatch
from . import budget_runs, data, intervals, objectives, patchify, train
from .builders import build_model, make_config
from .collector import collect_if_due, manual_collection

ARMS = ("baseline", "shallow-baseline", "dpar-entropy", "dpar-static", "dpar-shuffled")
ARM_KINDS = {"baseline": "baseline", "shallow-baseline": "baseline", "dpar-entropy": "dpar", "dpar-static": "dpar",
             "dpar-shuffled": "dpar"}
CLAIMS = (("dpar-entropy", "dpar-static", "entropy patches beat static patches with the same tokens per image"),
          ("dpar-entropy", "dpar-shuffled", "entropy patches beat the same patch sizes placed blind to content"),
          ("dpar-entropy", "baseline", "DPAR beats the baseline of the same depth at equal FLOPs"),
          ("dpar-entropy", "shallow-baseline", "DPAR beats a compute-matched shallower baseline (equal FLOPs and "
                                               "about equal steps)"))
FULL = dict(train_images=4096, val_images=256, image_size=16, grid=8, colors=256, size="tiny-global", overrides=(),
            budget_steps=256, batch_size=8, lr=3e-3, warmup=0.1, seeds=3, entropy_overrides=(), entropy_steps=400,
            entropy_batch_size=32, entropy_lr=2e-3, target_reduction=1.8, max_patch_size=4, bins=4)
QUICK = dict(FULL, train_images=512, val_images=64, overrides=("global_layers=3",), budget_steps=20,
             entropy_steps=60)
MIN_LR_SHARE = 0.1  # the cosine ends at this share of the peak lr


def warmup_cosine(step: int, steps: int, warmup: float) -> float:
    """lr multiplier of 0-based ``step`` of ``steps``: linear warmup over the first ``warmup`` share of the steps,
    then a cosine from 1 down to MIN_LR_SHARE at the last step."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return (step + 1) / ramp
    progress = (step - ramp) / max(1, steps - 1 - ramp)
    return MIN_LR_SHARE + (1 - MIN_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclasses.dataclass
class TokenSet:
    """A token dataset in memory: tokens int64 [N, T], labels int64 [N], grid_width."""
    tokens: torch.Tensor
    labels: torch.Tensor
    grid_width: int

    @classmethod
    def load(cls, root: str) -> TokenSet:
        dataset = data.TokenGridDataset(root)
        tokens, labels = dataset.batch(torch.arange(len(dataset)))
        return cls(tokens, labels, dataset.grid_width)

    def __len__(self) -> int:
        return len(self.labels)


def shuffled_table(table: patchify.PatchTable, seed: int) -> patchify.PatchTable:
    """``table`` with the patch lengths of every grid row permuted at random (``seed``): each row keeps its
    multiset of lengths (so the size histogram and the patches per image stay), the boundaries ignore content."""
    lengths = table.patch_lengths.long()
    start = torch.cumsum(lengths, 0) - lengths  # token offset of each patch; every image holds T tokens
    row = start // table.grid_width  # a global row index: patches never cross a row
    keys = row.double() + torch.rand(len(row), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = torch.argsort(keys)
    return patchify.PatchTable(table.patch_lengths[order].contiguous(), table.cu_patches, table.entropies,
                               table.threshold, table.max_patch_size, table.grid_width)


def step_flops(kind: str, config, table, indices: torch.Tensor) -> float:
    """Generator training FLOPs of one step on items ``indices`` (dpar.model.flops, the paper's convention)."""
    if kind == "baseline":
        return float(model_flops.baseline_training_flops(config, len(indices))["total"])
    patches = PatchBatch.from_lengths(*table.batch(indices), table.grid_width)
    return float(model_flops.dpar_training_flops(config, patches)["total"])


def steps_to_budget(kind: str, config, table, budget: float, items: int, batch_size: int, seed: int) -> list[float]:
    """FLOPs of each step of a run in data order ``seed`` up to the first step whose cumulative FLOPs reach
    ``budget`` (its length is the run's step count)."""
    costs, total = [], 0.0
    while total < budget:
        costs.append(step_flops(kind, config, table, train.batch_indices(len(costs), batch_size, items, seed)))
        total += costs[-1]
    return costs


@torch.no_grad()
def token_nll(kind: str, model, tokens: TokenSet, table, batch_size: int = 64) -> torch.Tensor:
    """float32 [N, T]: held-out NLL of every token of ``tokens`` (a TokenSet) under ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(tokens), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(tokens)))
        grid, labels = tokens.tokens[indices], tokens.labels[indices]
        patches = None if table is None else PatchBatch.from_lengths(*table.batch(indices), tokens.grid_width)
        logits = model(grid, labels) if kind == "baseline" else model(grid, labels, patches)
        nll = torch.nn.functional.cross_entropy(logits.float(), grid.reshape(-1), reduction="none")
        rows.append(nll.reshape(grid.shape))
    model.train(was_training)
    return torch.cat(rows)


def _update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int) -> None:
    """Step ``step`` (0-based) of a training loop run inside collector.manual_collection: backward, clipping at
    1.0 (as `dpar train`), the optimizer step, and the collection when one is due."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    collect_if_due(step + 1)


def train_generator(kind: str, config, train_set: TokenSet, table, costs: list[float], settings: dict, seed: int,
                    evaluate_at: dict) -> tuple[torch.nn.Module, dict]:
    """Train a fresh ``kind`` model for len(costs) steps (AdamW as `dpar train`, warmup + cosine over those steps,
    data order and init from ``seed``); ``evaluate_at`` {step: fn(model) -> value} is called after those steps.
    Returns (model, {step: value})."""
    torch.manual_seed(seed)
    model = build_model(kind, dataclasses.asdict(config))
    optimizer = train.make_optimizer(model, settings["lr"], (0.9, 0.95), 0.05)
    loss_module = objectives.LossModule(model, train_set.grid_width)
    results, steps = {}, len(costs)
    model.train()
    with manual_collection():
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = settings["lr"] * warmup_cosine(step, steps, settings["warmup"])
            indices = train.batch_indices(step, settings["batch_size"], len(train_set), seed)
            torch.manual_seed(seed * 1_000_003 + step * 1_009)  # class-label dropout of this step
            patches = None if table is None else loss_module.patch_batch(table.batch(indices), "cpu")
            loss = loss_module(train_set.tokens[indices], train_set.labels[indices], patches)
            if not torch.isfinite(loss):
                raise ValueError(f"{kind} run (seed {seed}) reached a non-finite loss at step {step + 1}")
            _update(model, optimizer, loss, step)
            if step + 1 in evaluate_at:
                results[step + 1] = evaluate_at[step + 1](model)
    return model, results


def train_entropy_model(train_set: TokenSet, val_set: TokenSet, config: EntropyConfig, settings: dict,
                        seed: int) -> tuple[torch.nn.Module, dict]:
    """The shared entropy model: ``entropy_steps`` steps of warmup + cosine, held-out loss at 1/4 .. 4/4 of them
    (the last two show how close to convergence it is). Returns (model in eval mode, its record)."""
    torch.manual_seed(seed)
    model = build_model("entropy", dataclasses.asdict(config))
    optimizer = train.make_optimizer(model, settings["entropy_lr"], (0.9, 0.95), 0.05)
    steps, batch = settings["entropy_steps"], settings["entropy_batch_size"]
    marks, curve = {round(steps * k / 4) for k in range(1, 5)}, []
    model.train()
    with manual_collection():
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = settings["entropy_lr"] * warmup_cosine(step, steps, settings["warmup"])
            loss = model.loss(train_set.tokens[train.batch_indices(step, batch, len(train_set), seed)])
            _update(model, optimizer, loss, step)
            if step + 1 in marks:
                model.eval()
                with torch.no_grad():
                    heldout = sum(float(model.loss(val_set.tokens[i:i + 64])) * len(val_set.tokens[i:i + 64])
                                  for i in range(0, len(val_set), 64)) / len(val_set)
                model.train()
                curve.append([step + 1, heldout])
    model.eval()
    sample = train_set.tokens[:batch]
    with FlopCounterMode(display=False) as counter:
        build_model("entropy", dataclasses.asdict(config)).loss(sample).backward()
    train_step = float(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.loss(sample)
    per_image = float(counter.get_total_flops()) / batch
    scored = len(train_set) + len(val_set)
    return model, {"config": dataclasses.asdict(config), "steps": steps, "batch_size": batch,
                   "heldout_loss_curve": curve, "train_flops": train_step * steps,
                   "inference_flops": per_image * scored, "inference_images": scored}


def entropy_bins(entropies: torch.Tensor, bins: int) -> tuple[list[float], torch.Tensor]:
    """(edges, bin int64 [N, T-1]): token i >= 1 falls in the entropy-quantile bin of H_{i-1} (the entropy model's
    uncertainty about it); ``bins`` equally populated bins over the held-out tokens."""
    before = entropies[:, :-1].double()
    edges = torch.quantile(before.reshape(-1), torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    index = torch.bucketize(before, edges[1:-1], right=True)
    return edges.tolist(), index


def arm_configs(settings: dict, train_root: str, entropy_table, seed: int) -> dict:
    """{arm: ModelConfig}: DPAR and the full-depth baseline from the preset (+ overrides); the shallow baseline's
    depth is the one whose FLOPs per step come closest to dpar-entropy's mean over its first steps."""
    dataset = data.TokenGridDataset(train_root)
    dpar_config = ModelConfig(**make_config("dpar", settings["size"], dataset, list(settings["overrides"])))
    batch = settings["batch_size"]
    probe = [step_flops("dpar", dpar_config, entropy_table, train.batch_indices(s, batch, len(dataset), seed))
             for s in range(8)]
    target = sum(probe) / len(probe)

    def baseline_of_depth(depth: int) -> ModelConfig:
        return dataclasses.replace(dpar_config, encoder_layers=0, global_layers=depth, decoder_layers=0)

    depths = range(1, dpar_config.total_layers)
    shallow = min(depths, key=lambda d: abs(model_flops.baseline_training_flops(baseline_of_depth(d), batch)["total"]
                                            - target))
    return {"baseline": dpar_config, "shallow-baseline": baseline_of_depth(shallow), "dpar-entropy": dpar_config,
            "dpar-static": dpar_config, "dpar-shuffled": dpar_config}


def prepare(out: str, settings: dict) -> dict:
    """Data, the shared entropy model, the threshold and the (train, held-out) patch tables."""
    tokenizer = budget_runs.prepare_data(out, settings, seed=0)
    train_root, val_root = os.path.join(out, "data", "train"), os.path.join(out, "data", "val")
    train_set, val_set = TokenSet.load(train_root), TokenSet.load(val_root)
    dataset = data.TokenGridDataset(train_root)
    entropy_config = EntropyConfig(**make_config("entropy", "tiny", dataset,
                                                 ["num_heads=2", "num_kv_heads=2", *settings["entropy_overrides"]]))
    print(f"training the entropy model ({settings['entropy_steps']} steps)", flush=True)
    entropy_model, entropy_record = train_entropy_model(train_set, val_set, entropy_config, settings, seed=0)
    entropies = {"train": patchify.dataset_entropies(entropy_model, data.TokenGridDataset(train_root)),
                 "val": patchify.dataset_entropies(entropy_model, data.TokenGridDataset(val_root))}
    width, size = train_set.grid_width, settings["max_patch_size"]
    threshold = patchify.threshold_for_reduction(entropies["train"], settings["target_reduction"], size, width)
    entropy = {s: patchify.PatchTable.from_entropies(entropies[s], threshold, size, width) for s in entropies}
    per_image = round(entropy["train"].patch_lengths.numel() / len(entropy["train"]))
    static = {s: budget_runs.static_table(per_image, entropies[s], width) for s in entropies}
    with open(os.path.join(out, "data", "split.json")) as f:
        split = json.load(f)
    return {"tokenizer": tokenizer, "train": train_set, "val": val_set, "train_root": train_root,
            "entropy": entropy, "static": static, "threshold": threshold, "entropy_record": entropy_record,
            "entropies": entropies, "split": split}


def arm_tables(prepared: dict, arm: str, seed: int) -> tuple:
    """(train, held-out) patch tables of ``arm`` (None for the baselines); dpar-shuffled's depend on ``seed``."""
    if ARM_KINDS[arm] == "baseline":
        return None, None
    if arm == "dpar-shuffled":
        return (shuffled_table(prepared["entropy"]["train"], seed),
                shuffled_table(prepared["entropy"]["val"], seed + 7919))
    source = prepared["entropy" if arm == "dpar-entropy" else "static"]
    return source["train"], source["val"]


def run_arm(arm: str, config, prepared: dict, settings: dict, seed: int, budget: float, equal_steps: int,
            bins: torch.Tensor) -> dict:
    """One arm, one seed: trained to ``budget``; held-out NLL after ``equal_steps`` steps and at the end (overall
    and per entropy bin)."""
    kind = ARM_KINDS[arm]
    train_table, val_table = arm_tables(prepared, arm, seed)
    train_set, val_set = prepared["train"], prepared["val"]
    costs = steps_to_budget(kind, config, train_table, budget, len(train_set), settings["batch_size"], seed)

    def heldout(model) -> torch.Tensor:
        return token_nll(kind, model, val_set, val_table)

    evaluate_at = {len(costs): heldout}
    if equal_steps < len(costs):
        evaluate_at[equal_steps] = heldout
    started = time.perf_counter()
    _, results = train_generator(kind, config, train_set, train_table, costs, settings, seed, evaluate_at)
    final = results[len(costs)]
    later = final[:, 1:]
    per_bin = [float(later[bins == b].mean()) for b in range(settings["bins"])]
    tokens = val_set.tokens.shape[1] if val_table is None else val_table.patch_lengths.numel() / len(val_table)
    record = {"arm": arm, "seed": seed, "kind": kind, "steps": len(costs), "train_flops": sum(costs),
              "last_step_flops": costs[-1], "flops_per_step": sum(costs) / len(costs),
              "final_nll": float(final.mean()), "equal_steps_nll": float(results.get(equal_steps, final).mean()),
              "bin_nll": per_bin, "heldout_global_tokens_per_image": float(tokens),
              "seconds": time.perf_counter() - started}
    print(f"  [{arm} seed {seed}] {len(costs)} steps, held-out NLL {record['final_nll']:.4f} "
          f"(after {equal_steps} steps {record['equal_steps_nll']:.4f}), {record['seconds']:.0f}s", flush=True)
    return record


def summarise(runs: list[dict], settings: dict) -> dict:
    """Per-arm means with intervals and the paired CLAIMS differences, over the seeds every arm finished."""
    seeds = sorted({r["seed"] for r in runs})
    seeds = [s for s in seeds if all(any(r["arm"] == a and r["seed"] == s for r in runs) for a in ARMS)]
    if len(seeds) < 2:
        return {"seeds_complete": seeds}
    value = {(r["arm"], r["seed"]): r for r in runs}

    def series(arm: str, key: str, bin_index: int | None = None) -> list[float]:
        return [value[arm, s][key] if bin_index is None else value[arm, s][key][bin_index] for s in seeds]

    arms = {arm: {"final_nll": intervals.mean_interval(series(arm, "final_nll")),
                  "equal_steps_nll": intervals.mean_interval(series(arm, "equal_steps_nll")),
                  "bin_nll": [intervals.mean_interval(series(arm, "bin_nll", b)) for b in range(settings["bins"])],
                  "steps": series(arm, "steps"), "flops_per_step": series(arm, "flops_per_step")}
            for arm in ARMS}
    differences = {}
    for first, second, claim in CLAIMS:
        diff = intervals.paired_difference(series(first, "final_nll"), series(second, "final_nll"))
        diff["equal_steps"] = intervals.paired_difference(series(first, "equal_steps_nll"),
                                                          series(second, "equal_steps_nll"))
        diff["bins"] = [intervals.paired_difference(series(first, "bin_nll", b), series(second, "bin_nll", b))
                        for b in range(settings["bins"])]
        diff["claim"] = claim
        diff["sentence"] = claim_sentence(f"{first} - {second}", claim, diff)
        differences[f"{first} - {second}"] = diff
    return {"seeds_complete": seeds, "arms": arms, "differences": differences}


def claim_sentence(name: str, claim: str, diff: dict) -> str:
    """One sentence: does the 95% interval of the paired held-out NLL difference exclude zero."""
    interval = f"{diff['mean']:+.4f} nats [{diff['low']:+.4f}, {diff['high']:+.4f}] over {diff['n']} seeds"
    if diff["sign"] == "lower":
        verdict = "the interval excludes zero: supported"
    elif diff["sign"] == "higher":
        verdict = "the interval excludes zero in the other direction: contradicted"
    else:
        verdict = "the interval contains zero: not resolved at this scale"
    return f"'{claim}' ({name} = {interval}): {verdict}."


def machine() -> dict:
    """CPU (model name, family, model), cores, torch threads and version, load average at the time of the call."""
    fields = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    cpu = fields.get("model name", platform.processor())
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def run_ablation(out: str, settings: dict, seeds: list[int] | None = None) -> dict:
    """The whole ablation into ``out``; returns the ablation.json content."""
    started = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    seeds = list(range(settings["seeds"])) if seeds is None else seeds
    prepared = prepare(out, settings)
    configs = arm_configs(settings, prepared["train_root"], prepared["entropy"]["train"], seeds[0])
    batch = settings["batch_size"]
    budget = settings["budget_steps"] * model_flops.baseline_training_flops(configs["baseline"], batch)["total"]
    edges, bins = entropy_bins(prepared["entropies"]["val"], settings["bins"])
    sample = PatchBatch.from_lengths(*prepared["entropy"]["train"].batch(torch.arange(batch)),
                                     prepared["train"].grid_width)
    dpar_components = model_flops.dpar_training_flops(configs["dpar-entropy"], sample)
    models = {arm: {"kind": ARM_KINDS[arm], "layers": [c.encoder_layers, c.global_layers, c.decoder_layers],
                    "width": c.width, "num_heads": c.num_heads} for arm, c in configs.items()}
    models["dpar-entropy"]["global_share_of_flops"] = dpar_components["global"] / dpar_components["total"]
    result = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, "seeds": seeds,
              "data": prepared["split"], "threshold": prepared["threshold"],
              "train_reduction": prepared["entropy"]["train"].reduction,
              "heldout_reduction": prepared["entropy"]["val"].reduction,
              "flop_budget": budget, "equal_steps": settings["budget_steps"], "models": models,
              "entropy_model": prepared["entropy_record"], "entropy_bin_edges": edges,
              "patch_size_histogram": patch_histogram({"entropy": prepared["entropy"]["train"],
                                                       "static": prepared["static"]["train"]}),
              "machine": machine(), "runs": []}
    for seed in seeds:
        for arm in ARMS:
            result["runs"].append(run_arm(arm, configs[arm], prepared, settings, seed, budget,
                                          settings["budget_steps"], bins))
        result.update(summarise(result["runs"], settings), seconds=time.perf_counter() - started)
        result["machine"]["load_average_end"] = machine()["load_average"]
        with open(os.path.join(out, "ablation.json"), "w") as f:
            json.dump(result, f, indent=1)
    plot_arms(result, os.path.join(out, "nll_by_arm.png"))
    plot_histogram(result["patch_size_histogram"], os.path.join(out, "patch_sizes.png"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(result))
    return result


def patch_histogram(tables: dict) -> dict:
    """{name: {length: share of patches}} of the training patch tables."""
    return {name: {int(length): count / table.patch_lengths.numel()
                   for length, count in enumerate(torch.bincount(table.patch_lengths.long()).tolist()) if count}
            for name, table in tables.items()}


def plot_arms(result: dict, path: str) -> None:
    """Final held-out NLL per arm: each seed (dots) and the mean with its 95% interval."""
    from .sample import _pyplot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for x, arm in enumerate(ARMS):
        values = [r["final_nll"] for r in result["runs"] if r["arm"] == arm]
        axis.scatter([x] * len(values), values, color="grey", s=12, zorder=2)
        stats = result.get("arms", {}).get(arm, {}).get("final_nll")
        if stats:
            axis.errorbar([x + 0.15], [stats["mean"]], yerr=[[stats["mean"] - stats["low"]],
                                                            [stats["high"] - stats["mean"]]], fmt="o", capsize=4)
    axis.set_xticks(range(len(ARMS)), ARMS, fontsize=8)
    axis.set_ylabel("held-out NLL (nats / token)")
    axis.set_title("Final held-out NLL at equal training FLOPs (mean, 95% t interval)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_histogram(histogram: dict, path: str) -> None:
    """Share of patches per patch length, one bar group per patching."""
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


def _interval(stats: dict) -> str:
    return f"{stats['mean']:.4f} [{stats['low']:.4f}, {stats['high']:.4f}]"


def report(result: dict) -> str:
    """Markdown summary of ablation.json."""
    s, split, entropy = result["settings"], result["data"], result["entropy_model"]
    layers = {arm: "/".join(map(str, m["layers"])) for arm, m in result["models"].items()}
    global_share = 100 * result["models"]["dpar-entropy"]["global_share_of_flops"]
    lines = ["# DPAR ablation: paired seeds at one training-FLOP budget", "",
             f"- Data: {split['train_crops']} training and {split['heldout_crops']} held-out crops of "
             f"{s['image_size']} px from {len(split['photos'])} scikit-image photos, {s['grid']}x{s['grid']} tokens "
             f"of a {s['colors']}-colour palette; held-out crops come from {split['heldout_regions']} held-out "
             f"regions ({split['train_regions']} for training) and "
             f"{split['heldout_crops_overlapping_training']} of them share a pixel with a training crop.",
             f"- Models: width {result['models']['baseline']['width']}; DPAR {layers['dpar-entropy']} "
             f"(encoder/global/decoder; global stack {global_share:.0f}% "
             f"of its training FLOPs), baseline {sum(result['models']['baseline']['layers'])} layers, shallow "
             f"baseline {sum(result['models']['shallow-baseline']['layers'])} layers. Entropy threshold "
             f"{result['threshold']:.4f} nats: reduction {result['train_reduction']:.3f}x (train), "
             f"{result['heldout_reduction']:.3f}x (held-out), max patch {s['max_patch_size']}.",
             f"- Budget {result['flop_budget']:.3e} generator training FLOPs per run ({s['budget_steps']} baseline "
             f"steps of batch {s['batch_size']}), AdamW lr {s['lr']} with {100 * s['warmup']:.0f}% warmup and a "
             f"cosine over each run's own steps; seeds {result['seeds']} (init and data order, paired across arms).",
             f"- Entropy model (shared, not in the generator budget): {entropy['steps']} steps, "
             f"{entropy['train_flops']:.3e} training FLOPs, {entropy['inference_flops']:.3e} FLOPs to score "
             f"{entropy['inference_images']} crops; held-out loss at 1/4..4/4 of its steps: "
             + ", ".join(f"{v:.4f}" for _, v in entropy["heldout_loss_curve"]) + ".", ""]
    if "arms" not in result:
        return "\n".join(lines + ["Fewer than two seeds finished: no intervals.", ""])
    lines += ["| arm | layers | steps | FLOPs / step | final held-out NLL, mean [95% CI] | NLL after "
              f"{result['equal_steps']} steps |", "|---|---|---|---|---|---|"]
    for arm, stats in result["arms"].items():
        steps = sorted(set(stats["steps"]))
        lines.append(f"| {arm} | {layers[arm]} | {'/'.join(map(str, steps))} | "
                     f"{sum(stats['flops_per_step']) / len(stats['flops_per_step']):.3e} | "
                     f"{_interval(stats['final_nll'])} | {_interval(stats['equal_steps_nll'])} |")
    lines += ["", "Paired differences of final held-out NLL (negative: the first is better), mean [95% CI]:", "",
              "| difference | final | after the baseline's steps |", "|---|---|---|"]
    for name, diff in result["differences"].items():
        lines.append(f"| {name} | {diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] | "
                     f"{diff['equal_steps']['mean']:+.4f} [{diff['equal_steps']['low']:+.4f}, "
                     f"{diff['equal_steps']['high']:+.4f}] |")
    lines += [""] + [f"- {diff['sentence']}" for diff in result["differences"].values()]
    edges = result["entropy_bin_edges"]
    lines += ["", "Final held-out NLL per entropy bin (token i binned by the entropy model's H_{i-1}):", "",
              "| arm | " + " | ".join(f"H in [{edges[b]:.2f}, {edges[b + 1]:.2f}]" for b in range(len(edges) - 1))
              + " |", "|---|" + "---|" * (len(edges) - 1)]
    for arm, stats in result["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(_interval(b) for b in stats["bin_nll"]) + " |")
    for name in ("dpar-entropy - dpar-static", "dpar-entropy - dpar-shuffled"):
        bins = result["differences"][name]["bins"]
        lines.append(f"| {name} | " + " | ".join(f"{b['mean']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]"
                                                  for b in bins) + " |")
    m = result["machine"]
    lines += ["", "Patch sizes, share of training patches: " + "; ".join(
        f"{name}: " + ", ".join(f"{n}: {share:.2f}" for n, share in sorted(h.items()))
        for name, h in result["patch_size_histogram"].items()) + " (dpar-shuffled: as entropy).",
        "", f"{result['seconds']:.0f} s wall on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch "
        f"thread(s); load average {m['load_average']} at the start, {m.get('load_average_end')} at the end: the cores "
        "were shared). Files: ablation.json, nll_by_arm.png, patch_sizes.png.", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (ablation.json, report.md, PNGs, data)")
    parser.add_argument("--quick", action="store_true", help="small settings, same fields: under 3 minutes")
    parser.add_argument("--budget-steps", type=int, help="the FLOP budget in baseline steps (default 256, quick 20)")
    parser.add_argument("--seeds", type=int, help="paired seeds 0..N-1 (default 3; at least 2 for intervals)")
    parser.add_argument("--entropy-steps", type=int, help="entropy model steps (default 400, quick 60)")
    parser.add_argument("--batch-size", type=int, help="generator batch size (default 8)")
    parser.add_argument("--lr", type=float, help="generators' peak AdamW learning rate (default 3e-3)")
    parser.add_argument("--train-images", type=int)
    parser.add_argument("--val-images", type=int)
    parser.add_argument("--override", nargs="*", metavar="KEY=VALUE", help="DPAR / baseline config fields")
    parser.add_argument("--target-reduction", type=float, help="global token reduction of the entropy patches")
    budget_runs.add_threads_argument(parser)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    for name in ("budget_steps", "seeds", "entropy_steps", "batch_size", "lr", "train_images", "val_images",
                 "target_reduction"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.override is not None:
        settings["overrides"] = tuple(args.override)
    if settings["seeds"] < 2:
        raise ValueError(f"--seeds must be at least 2 for intervals, got {settings['seeds']}")
    result = run_ablation(args.out, settings)
    print(report(result))
    print(f"{result['seconds']:.0f}s -> {args.out}")
