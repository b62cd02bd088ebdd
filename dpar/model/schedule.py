"""Out-of-step sampling: each image at its own token, a policy choosing when the global step runs.

In DPAR's sampler an image alternates local steps (decoder, encoder and entropy model, one token each) with a global
step whenever its open patch closes. Lockstep runs the global step at every token at which some image closes a
patch, so with many unaligned images it runs at almost every token. Out of step, an image whose patch closed waits
(its local steps pause) and the global step runs for all waiting images at once when the policy says so, trading
extra local steps (the waiting rows idle through them) for fewer global ones. Each image's tokens are the same under
every policy: only the order of work changes (the sampling noise is keyed by image and position).

``ImageStates`` keeps the bookkeeping on the device; a scheduling step reads one small tensor to the host
(``read``).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from dpar_kernels.patching import next_patch_starts

from .patcher import PatchBatch

SCHEDULES = ("out_of_step", "lockstep")


@dataclass(frozen=True)
class WaitFraction:
    """Run the global step when at least ``fraction`` of the unfinished images wait (always when all of them do).
    A fraction of 0 is lockstep: every closed patch gets its global step at once."""
    fraction: float

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be a number in [0, 1], got {self.fraction!r}")

    def run_global(self, waiting: int, unfinished: int) -> bool:
        """Whether the ``waiting`` images (> 0) of the ``unfinished`` ones get their global step now."""
        return waiting >= max(1, math.ceil(self.fraction * unfinished))


LOCKSTEP = WaitFraction(0.0)
# "out_of_step" by how the sampler runs its steps (dpar_sampler.gathers_rows), chosen with
# benchmarks/sampling_cost_model.py (benchmarks/results/sampling_cost_model_*): over every row (GPU roofline: a
# global step costs the same whichever images it serves; waiting for half of them is best for the global-heavy L and
# XL depths) or over the rows they serve (CPU float32: the rows computed do not depend on the policy, only the number
# of steps does; waiting for 30% is best with long patches and ties lockstep with short ones).
OUT_OF_STEP = {False: WaitFraction(0.5), True: WaitFraction(0.3)}


def schedule_policy(schedule, gathered: bool) -> WaitFraction:
    """"out_of_step" (the default policy of steps that are ``gathered`` or not), "lockstep", or a WaitFraction ->
    the policy."""
    if isinstance(schedule, WaitFraction):
        return schedule
    if schedule == "out_of_step":
        return OUT_OF_STEP[gathered]
    if schedule == "lockstep":
        return LOCKSTEP
    raise ValueError(f"schedule must be one of {SCHEDULES} or a WaitFraction, got {schedule!r}")


class ImageStates:
    """Device bookkeeping of ``batch`` images of ``length`` tokens sampled out of step (all int64 / bool [batch]):
    position (the next token to sample; ``length`` once finished), start (first token of the open patch),
    waiting (the open patch closed before ``position``; its global step has not run) and boundary bool
    [batch, length] (token t starts a patch)."""

    def __init__(self, batch: int, length: int, max_patch_size: int, grid_width: int,
                 thresholds: torch.Tensor | None, device):
        self.length, self.max_patch_size, self.grid_width = length, max_patch_size, grid_width
        self.thresholds = thresholds  # float64 [batch]; None: fixed-size patches (no entropy rule)
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)
        self.waiting = torch.zeros(batch, dtype=torch.bool, device=device)
        self.boundary = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.boundary[:, 0] = True

    def read(self, flags: bool) -> tuple[int, int, list[bool] | None, list[bool] | None]:
        """The scheduling step's one host read -> (waiting images, unfinished images, whether each image waits,
        whether each is unfinished); the two lists only with ``flags`` (gathered steps need them), else None (two
        counts: no host work that grows with the batch)."""
        if not flags:
            waits, left = torch.stack([self.waiting.sum(), (self.position < self.length).sum()]).tolist()
            return waits, left, None, None
        waiting, unfinished = torch.stack([self.waiting, self.position < self.length]).tolist()
        return sum(waiting), sum(unfinished), waiting, unfinished

    def active(self) -> torch.Tensor:
        """bool [batch]: the images whose next local step runs (not waiting, not finished)."""
        return ~self.waiting & (self.position < self.length)

    def slot(self) -> torch.Tensor:
        """int64 [batch]: position clamped into the grid (finished images point at their last token)."""
        return self.position.clamp(max=self.length - 1)

    def write(self, buffer: torch.Tensor, values: torch.Tensor, active: torch.Tensor) -> None:
        """buffer [n, length, ...] (n = batch, or 2 * batch for the CFG rows), values [n, ...]: stores each active
        image's value at its position, in place."""
        rows = buffer.shape[0]
        repeat = rows // active.shape[0]
        index = self.slot().repeat(repeat).view(rows, 1, *(1,) * (buffer.dim() - 2))
        index = index.expand(rows, 1, *buffer.shape[2:])
        kept = buffer.gather(1, index).squeeze(1)
        mask = active.repeat(repeat).view(rows, *(1,) * (values.dim() - 1))
        buffer.scatter_(1, index, torch.where(mask, values, kept).unsqueeze(1))

    def advance(self, active: torch.Tensor, entropy: torch.Tensor | None) -> None:
        """After a local step: the active images move one token on; those whose next token starts a patch (rules of
        dk.entropy_patch_lengths; ``entropy`` float [batch] is H of the token just sampled) start waiting."""
        self.position += active.long()
        starts = next_patch_starts(self.position, entropy, self.thresholds, self.start, self.max_patch_size,
                                   self.grid_width)
        self.waiting |= active & (self.position < self.length) & starts

    def close_waiting(self) -> None:
        """After the waiting images' global step: each opens its next patch at its position."""
        self.start = torch.where(self.waiting, self.position, self.start)
        slot = self.slot()[:, None]
        self.boundary.scatter_(1, slot, self.waiting[:, None] | self.boundary.gather(1, slot))
        self.waiting.zero_()

    def patch_batch(self) -> PatchBatch:
        """The PatchBatch of every patch (read once, after the last token)."""
        firsts = self.boundary.reshape(-1).nonzero().squeeze(1)
        lengths = torch.diff(firsts, append=firsts.new_full((1,), self.boundary.numel()))
        counts = self.boundary.sum(1)
        cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return PatchBatch.from_lengths(lengths, cu, self.grid_width)


def simulate_schedule(patch_lengths: list[list[int]], policy: WaitFraction) -> tuple[list[int], list[int]]:
    """The steps DparSampler takes for images with these patches (one list of patch lengths per image, each
    summing to the same T) under ``policy``, without a model -> (images advanced by each local step, images served
    by each global step). For cost models: the sampler's own counts are the same (tests/model/test_schedule.py)."""
    length = sum(patch_lengths[0])
    starts = [set(itertools.accumulate(lengths[:-1])) for lengths in patch_lengths]
    position, waiting = [0] * len(patch_lengths), [False] * len(patch_lengths)
    advanced, served = [], []
    while True:
        unfinished = sum(p < length for p in position)
        count = sum(waiting)
        if not unfinished:
            return advanced, served
        if count and (count == unfinished or policy.run_global(count, unfinished)):
            served.append(count)
            waiting = [False] * len(waiting)
        active = [b for b, p in enumerate(position) if not waiting[b] and p < length]
        for b in active:
            position[b] += 1
            waiting[b] = position[b] in starts[b]
        advanced.append(len(active))
