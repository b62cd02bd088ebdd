"""Validation of the sampling knobs of the generate entry points: NaN/inf that would give garbage or a RuntimeError
deep in the decode loop become a ValueError naming the knob."""
import math

import torch


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_sampling_args(*, cfg_scale, temperature, threshold=None) -> None:
    """cfg_scale finite; temperature finite and >= 0 (0: greedy); threshold (DPAR, float or [B] tensor) not NaN
    (+inf is allowed: entropy never starts a patch)."""
    _finite("cfg_scale", cfg_scale)
    if _finite("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(threshold, torch.Tensor):
        if threshold.is_floating_point() and bool(threshold.isnan().any()):  # once per generate call
            raise ValueError("threshold must not contain NaN")
    elif threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float or a [B] tensor, got {type(threshold).__name__}")
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
