"""`dpar train {entropy,dpar,baseline}`: train a model on a token dataset, resumable, single process or DDP.

AdamW with LlamaGen's defaults (lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on matrices only), gradient clipping
at 1.0, --precision autocast (bf16 on GPU). The data order and every random draw of step s are pure functions of
(seed, s, rank), so a run resumed from a checkpoint continues exactly (bitwise on CPU). DDP starts from torchrun's
environment (WORLD_SIZE > 1): gloo on CPU, nccl on GPU; --batch-size is the global batch. Outputs in --out:
checkpoint.safetensors (see dpar.pipeline.checkpoint) and log.jsonl (one JSON record per step).

Safeguards (dpar.pipeline.safeguards): arguments are checked before any work; SIGINT/SIGTERM finish the current
step, checkpoint it and exit non-zero; a NaN/inf loss or gradient norm stops training with an error before that step
is saved; --resume needs a checkpoint and refuses changed settings (listing them) unless --allow-changed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from .builders import KINDS, build_model, load_model, make_config
from .checkpoint import load_checkpoint, save_checkpoint
from .collector import collect_if_due, manual_collection
from .data import TokenGridDataset
from .objectives import LossModule, PatchSource, heldout_loss
from .runlog import read_log
from .safeguards import (
    StopSignals,
    TrainingInterrupted,
    check_finite_step,
    check_resume,
    trajectory_settings,
    validate_train_args,
)

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"


def batch_indices(step: int, global_batch: int, num_items: int, seed: int) -> torch.Tensor:
    """int64 [global_batch]: the dataset items of ``step`` (one seeded permutation per epoch, last batch dropped)."""
    per_epoch = num_items // global_batch
    if per_epoch == 0:
        raise ValueError(f"batch size {global_batch} exceeds the {num_items} items of the dataset")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * global_batch:(position + 1) * global_batch]


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float):
    """AdamW with weight decay on parameters of rank >= 2 only (LlamaGen's configure_optimizers): torch's fused
    kernel (one call per parameter group on CPU and CUDA) where every parameter is a CPU or CUDA float tensor,
    else the multi-tensor (foreach) one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=not fused)


def precision_context(precision: str | None, device: torch.device):
    """(autocast context, GradScaler) of --precision (None: bf16 on CUDA, fp32 elsewhere)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class Distributed:
    """rank / world size / device of this process; initialises torch.distributed under torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank if self.world > 1 else (self.device.index or 0))
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def sum(self, value: float) -> float:
        return self.mean(value) * self.world


def _read_log(path: str, up_to_step: int) -> list[dict]:
    if not os.path.exists(path):
        return []
    return [r for r in read_log(path) if r.get("step", 0) <= up_to_step]


def _patch_source(args, dataset, device) -> PatchSource | None:
    if args.kind != "dpar":
        return None
    if args.patches:
        from .patchify import PatchTable
        return PatchSource(table=PatchTable.load(args.patches, dataset))
    if args.entropy_ckpt and args.threshold is not None:
        from .patchify import check_entropy_vocab
        entropy_model, _ = load_model(args.entropy_ckpt, "entropy", device)
        check_entropy_vocab(entropy_model, dataset, args.entropy_ckpt)
        return PatchSource(entropy_model=entropy_model, threshold=args.threshold,
                           max_patch_size=args.max_patch_size, grid_width=dataset.grid_width)
    raise ValueError("training dpar needs --patches FILE (from `dpar patchify`) or --entropy-ckpt and --threshold")


def train(args: argparse.Namespace, on_step=None) -> list[dict]:
    """Run (or resume) training as ``args`` say; returns the log records. ``on_step(record, model)`` is called
    after every step (after the checkpoint of that step is written).

    Raises ValueError for bad arguments or a refused resume, NonFiniteLossError (a ValueError) on a NaN/inf loss,
    TrainingInterrupted after SIGINT/SIGTERM (the last finished step checkpointed).
    """
    validate_train_args(args)
    with StopSignals() as stop, manual_collection():
        return _train(args, on_step, stop)


def _train(args: argparse.Namespace, on_step, stop: StopSignals) -> list[dict]:
    env = Distributed(args.device)
    dataset = TokenGridDataset(args.data)
    dataset.preload()  # a small dataset: one read up front instead of two file reads per item per step
    config = make_config(args.kind, args.size, dataset, args.override)
    torch.manual_seed(args.seed)
    model = build_model(args.kind, config).to(env.device)
    optimizer = make_optimizer(model, args.lr, (args.beta1, args.beta2), args.weight_decay)
    ckpt_path, log_path = os.path.join(args.out, CHECKPOINT), os.path.join(args.out, LOG)
    autocast, scaler = precision_context(args.precision, env.device)
    step, cum_flops, saved_step = 0, 0.0, None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise ValueError(f"--resume: no checkpoint {ckpt_path} to resume from (check --out; drop --resume to "
                             f"start from step 0)")
        info = load_checkpoint(ckpt_path, model, kind=args.kind, config=config, optimizer=optimizer)
        check_resume(ckpt_path, info["extra"], args, optimizer)
        step, cum_flops = info["step"], info["extra"]["cum_flops"]
        if scaler.is_enabled() and "grad_scaler" in info["extra"]:  # fp16: the loss scale goes on where it was
            scaler.load_state_dict(info["extra"]["grad_scaler"])
        saved_step = step
    records = _read_log(log_path, step) if args.resume else []
    os.makedirs(args.out, exist_ok=True)
    if env.rank == 0:
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    patch_source = _patch_source(args, dataset, env.device)
    loss_module = LossModule(model, dataset.grid_width)
    trainer = loss_module
    if env.world > 1:
        trainer = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if args.compile:
        trainer = torch.compile(trainer, fullgraph=True, dynamic=True)
    if args.batch_size % env.world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the world size {env.world}")
    local_batch = args.batch_size // env.world
    progress = _progress(args, step, env.rank)
    model.train()
    while (args.steps is None or step < args.steps) and (args.flop_budget is None or cum_flops < args.flop_budget):
        started = time.perf_counter()
        indices = batch_indices(step, args.batch_size, len(dataset), args.seed)
        indices = indices[env.rank * local_batch:(env.rank + 1) * local_batch]
        tokens, labels = dataset.batch(indices)
        tokens, labels = tokens.to(env.device), labels.to(env.device)
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + env.rank)
        with autocast:  # the entropy model cutting patches on the fly runs at the training precision too
            host_patches = loss_module.patch_batch(None if patch_source is None else patch_source(indices, tokens),
                                                   "cpu")  # kept on the host for the FLOP count: no device read
            patches = None if host_patches is None else host_patches.to(env.device)
            loss = trainer(tokens, labels, patches)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        flops_now = env.sum(model.training_flops(tokens, host_patches))  # this rank's batch
        # the step's one host read: loss, gradient norm and (fp16) the loss scale after the update
        logged = [loss.detach().float(), grad_norm.float()]
        if scaler.is_enabled():
            logged.append(scaler._get_scale_async().float())
        loss_local, grad_norm_value, *loss_scale = torch.stack(logged).tolist()
        loss_value = env.mean(loss_local)
        # fp16: an overflowing gradient is the GradScaler's business (it skipped the update and lowered the scale)
        check_finite_step(step + 1, loss_value, 0.0 if scaler.is_enabled() else grad_norm_value, args.out,
                          saved_step)
        collect_if_due(step + 1)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        elapsed = time.perf_counter() - started
        step += 1
        cum_flops += flops_now
        record = {"step": step, "loss": loss_value, "grad_norm": grad_norm_value, "flops": flops_now,
                  "cum_flops": cum_flops, "tokens": args.batch_size * dataset.tokens_per_image,
                  "step_time": elapsed, "tokens_per_s": args.batch_size * dataset.tokens_per_image / elapsed,
                  "lr": args.lr}
        if loss_scale:
            record["loss_scale"] = loss_scale[0]
        if patches is not None:
            record["global_tokens"] = env.sum(float(patches.num_patches))
        if args.eval_data and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            record["val_loss"] = _validation_loss(args, loss_module, patch_source, env)
        records.append(record)
        finished = (args.steps is not None and step >= args.steps) or (
            args.flop_budget is not None and cum_flops >= args.flop_budget)
        stopping = stop.received is not None
        if env.world > 1:  # every rank stops after the same step
            stopping = env.sum(float(stopping)) > 0
        if env.rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if step % args.ckpt_every == 0 or finished or stopping:
                extra = {"cum_flops": cum_flops, "batch_size": args.batch_size, "seed": args.seed,
                         "data": os.path.abspath(args.data), "settings": trajectory_settings(args)}
                if scaler.is_enabled():
                    extra["grad_scaler"] = scaler.state_dict()
                save_checkpoint(ckpt_path, kind=args.kind, config=config, step=step, model=model,
                                optimizer=optimizer, extra=extra)
                saved_step = step
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if on_step is not None:
            on_step(record, model)
        if stopping and not finished:  # a signal during the last step: the run is complete anyway
            progress.close()
            raise TrainingInterrupted(stop.received or signal.SIGTERM, step, ckpt_path)
    progress.close()
    if env.world > 1:
        dist.barrier()
    return records


def _progress(args, step: int, rank: int):
    from tqdm import tqdm
    return tqdm(total=args.steps, initial=step, desc=f"train {args.kind}", disable=rank != 0 or args.quiet,
                dynamic_ncols=True)


def _validation_loss(args, loss_module: LossModule, patch_source, env: Distributed) -> float:
    dataset = TokenGridDataset(args.eval_data)
    dataset.preload()
    if patch_source is not None and patch_source.table is not None:
        raise ValueError("--eval-data with --patches needs on-the-fly patches (--entropy-ckpt and --threshold)")
    return heldout_loss(loss_module, dataset, patch_source, batch_size=args.batch_size, device=env.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which model to train")
    parser.add_argument("--data", required=True, help="token dataset root (codes/, labels/, optional meta.json)")
    parser.add_argument("--out", required=True, help="output folder (checkpoint.safetensors, log.jsonl)")
    parser.add_argument("--steps", type=int, help="total optimizer steps")
    parser.add_argument("--flop-budget", type=float, help="stop once the training FLOPs reach this many")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    parser.add_argument("--allow-changed", action="store_true",
                        help="with --resume: apply settings that differ from the checkpoint's instead of refusing")
    parser.add_argument("--size", default="tiny", help="config preset: tiny, B, L, XL")
    parser.add_argument("--override", nargs="*", metavar="KEY=VALUE", help="config fields to override")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--beta2", type=float, default=0.95)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--patches", help="dpar: patches file from `dpar patchify`")
    parser.add_argument("--entropy-ckpt", help="dpar: entropy model checkpoint, to cut patches on the fly")
    parser.add_argument("--threshold", type=float, help="dpar: entropy threshold for on-the-fly patches")
    parser.add_argument("--max-patch-size", type=int, default=4)
    parser.add_argument("--eval-data", help="held-out token dataset for val_loss")
    parser.add_argument("--eval-every", type=int, default=0, help="log val_loss every N steps (0: never)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the loss (one graph, forward and backward; dynamic shapes)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS),
                        help="autocast precision (default: bf16 on CUDA, fp32 on CPU); fp16 uses a GradScaler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    try:
        records = train(args)
    except TrainingInterrupted as stopped:
        print(f"dpar train: {stopped}", file=sys.stderr)
        raise SystemExit(128 + stopped.signum) from None
    if records and int(os.environ.get("RANK", "0")) == 0:
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, {last['cum_flops']:.3e} training FLOPs -> {args.out}")
