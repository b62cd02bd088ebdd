"""Validation of the sampling knobs of the generate entry points: NaN/inf that would give garbage or a RuntimeError
deep in the decode loop become a ValueError naming the knob."""
import math

import torch

from dpar_kernels._checks import check_finite


def check_sampling_args(*, cfg_scale, temperature, threshold=None) -> None:
    """cfg_scale finite; temperature finite and >= 0 (0: greedy); threshold (DPAR, float or [B] tensor) not NaN
    (+inf is allowed: entropy never starts a patch)."""
    check_finite("cfg_scale", cfg_scale)
    if check_finite("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(threshold, torch.Tensor):
        if threshold.is_floating_point() and bool(threshold.isnan().any()):  # once per generate call
            raise ValueError("threshold must not contain NaN")
    elif threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float or a [B] tensor, got {type(threshold).__name__}")
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
