"""What keeps `dpar train` from losing work or training on garbage: argument checks before any work, the settings a
checkpoint must be resumed with, SIGINT/SIGTERM turned into "finish the step, checkpoint, stop", and the stop on a
non-finite loss."""
from __future__ import annotations

import argparse
import math
import os
import signal
import threading

import torch

# Settings that shape the training trajectory: a resume must use the checkpoint's values (or --allow-changed).
OPTIMIZER_SETTINGS = ("lr", "beta1", "beta2", "weight_decay")
PATCH_SETTINGS = ("patches", "entropy_ckpt", "threshold", "max_patch_size")  # DPAR only
TRAJECTORY_SETTINGS = OPTIMIZER_SETTINGS + ("grad_clip", "batch_size", "seed", "data") + PATCH_SETTINGS
_PATHS = ("data", "patches", "entropy_ckpt")


class NonFiniteLossError(ValueError):
    """The loss or gradient norm of a step is NaN or inf; nothing of that step was saved."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the last finished step was checkpointed and training stopped."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         f"holds it, continue with --resume")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_train_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for settings that would do nothing, crash after work or train on garbage."""
    if args.steps is None and args.flop_budget is None:
        raise ValueError("give --steps or --flop-budget (or both)")
    positive_ints = ("steps", "batch_size", "ckpt_every", "max_patch_size")
    for name in positive_ints:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {value}")
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: never), got {args.eval_every}")
    for name in ("flop_budget", "lr", "grad_clip"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{_flag(name)} must be a finite number > 0, got {value}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(args, name)}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ValueError(f"--threshold must be a finite number, got {args.threshold}")


def trajectory_settings(args: argparse.Namespace) -> dict:
    """The TRAJECTORY_SETTINGS of ``args`` (paths absolute; patch settings for DPAR only), as stored in a
    checkpoint."""
    names = TRAJECTORY_SETTINGS if args.kind == "dpar" else TRAJECTORY_SETTINGS[:-len(PATCH_SETTINGS)]
    settings = {name: getattr(args, name, None) for name in names}
    for name in _PATHS:
        if settings.get(name) is not None:
            settings[name] = os.path.abspath(settings[name])
    return settings


def changed_settings(checkpoint: str, extra: dict, current: dict) -> list[str]:
    """"--flag: <checkpoint value> -> <current value>" for each setting the resumed run changes. Checkpoints older than
    the settings record hold batch_size, seed and data only, so only those are compared."""
    saved = extra.get("settings") or {k: extra[k] for k in ("batch_size", "seed", "data") if k in extra}
    return [f"{_flag(name)}: {saved[name]!r} in {checkpoint}, {current.get(name)!r} now"
            for name in sorted(saved) if saved[name] != current.get(name)]


def check_resume(checkpoint: str, extra: dict, args: argparse.Namespace, optimizer: torch.optim.Optimizer) -> None:
    """Refuse (ValueError listing the differences) a resume whose settings differ from the checkpoint's, unless
    args.allow_changed: then the new optimizer settings replace the restored ones (load_state_dict brings back the
    checkpoint's lr, betas and weight decay)."""
    differences = changed_settings(checkpoint, extra, trajectory_settings(args))
    allow = getattr(args, "allow_changed", False)
    if differences and not allow:
        raise ValueError("resume with different settings refused (pass --allow-changed to apply them):\n  "
                         + "\n  ".join(differences))
    if allow:
        for index, group in enumerate(optimizer.param_groups):
            group["lr"], group["betas"] = args.lr, (args.beta1, args.beta2)
            group["weight_decay"] = args.weight_decay if index == 0 else 0.0  # group 1: parameters of rank < 2


def check_finite_step(step: int, loss: float, grad_norm: float, out: str, saved_step: int | None) -> None:
    """NonFiniteLossError when the loss or gradient norm of ``step`` is NaN/inf (raised before it is saved)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = (f"the last good checkpoint (step {saved_step}) in {out} is kept" if saved_step is not None
            else f"no checkpoint was written to {out}")
    raise NonFiniteLossError(f"step {step}: loss {loss}, gradient norm {grad_norm}; training stopped, {kept}. "
                             f"Lower --lr or check the data and the checkpoint.")


class StopSignals:
    """Context manager: SIGINT/SIGTERM only set ``received`` (the signal number) so the trainer can finish the step,
    checkpoint and stop; a second signal acts as usual (the previous handlers are back after the first)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
