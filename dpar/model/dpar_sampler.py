"""DPAR's KV-cache sampler: a batch of image slots, each at its own token, scheduled by a policy (schedule.py).

A scheduling step reads one small tensor (schedule.ImageStates.summary: images waiting for the global step,
unfinished images), then runs, if the policy says so, one cached global step appended for the waiting images (their
closed patches are embedded and appended to the global sequence), then one local step appended for the active
images: the decoder predicts each one's next token from the encoder state of its previous token and the global
output before its patch, the sampled token feeds the encoder and the entropy model. Both steps compute every row
(static shapes: each is one compiled graph, and a row's arithmetic does not depend on which images share the step,
so every schedule gives the same tokens in any precision); the other rows append nothing and keep their state.
Everything else, patch bookkeeping included, stays on the device.

Classifier-free guidance doubles the rows: rows [0, B) carry the labels, rows [B, 2B) the null class; both rows of
a pair receive the same sampled token and share patch boundaries. Slots can be reloaded with new images while the
others run (``load``: continuous batching).
"""
import torch

from . import generation as gen
from .blocks import grid_positions
from .patcher import PatchBatch
from .sampling_args import check_sampling_args
from .schedule import ImageStates, schedule_policy


class DparSampler:
    """``batch`` image slots of a DPAR model; ``load`` starts images, ``step`` advances them, ``run`` finishes.

    tokens int64 [batch, T] holds each slot's tokens (valid up to its position); global_steps / local_steps count
    the steps run (each over the rows that need it)."""

    def __init__(self, model, batch: int, *, entropy_model, threshold, max_patch_size: int, cfg_scale=1.0,
                 temperature=1.0, top_k=None, top_p=None, schedule="out_of_step", compile=False):
        check_sampling_args(cfg_scale=cfg_scale, temperature=temperature, threshold=threshold)
        c = model.config
        if isinstance(max_patch_size, bool) or not isinstance(max_patch_size, int) or max_patch_size < 1:
            raise ValueError(f"max_patch_size must be an int >= 1, got {max_patch_size!r}")
        if entropy_model.config.grid_width != c.grid_width or entropy_model.config.vocab_size != c.vocab_size:
            raise ValueError("entropy_model must share the model's grid width and vocabulary")
        self.policy = schedule_policy(schedule)
        self.model, self.entropy_model, self.batch, self.cfg_scale = model, entropy_model, batch, cfg_scale
        self.rows = batch if cfg_scale == 1.0 else 2 * batch
        self.temperature, self.sampling = temperature, dict(temperature=temperature, top_k=top_k, top_p=top_p)
        weight, length = model.head.weight, c.tokens_per_image
        self.device = weight.device
        thresholds = gen._thresholds(threshold, batch, self.device)
        entropy_needed = bool((thresholds < float("inf")).any())  # all +inf: fixed-size patches, no entropy model
        self._step = gen._step_function(_dpar_step, compile)
        self._append_patches = gen._step_function(_append_patches, compile)
        self.max_patch_size = max_patch_size
        self.encoder_cache = gen._cache(model, c.encoder_layers, self.rows, length)
        self.global_cache = gen._cache(model, c.global_layers, self.rows, length + 1)
        self.decoder_cache = gen._cache(model, c.decoder_layers, self.rows, length)
        self.entropy_cache = entropy_model.new_cache(batch, self.device, entropy_model.head.weight.dtype) \
            if entropy_needed else None
        self.images = ImageStates(batch, length, max_patch_size, c.grid_width,
                                  thresholds if entropy_needed else None, self.device)
        self.images.position.fill_(length)  # every slot empty (finished) until loaded
        self.condition = torch.zeros(self.rows, c.decoder_layers * c.width, dtype=weight.dtype, device=self.device)
        self.states = torch.zeros(self.rows, length, c.width, dtype=weight.dtype, device=self.device)
        self.previous = torch.zeros(self.rows, c.width, dtype=weight.dtype, device=self.device)
        self.tokens = torch.zeros(batch, length, dtype=torch.long, device=self.device)
        self.noise = None if temperature == 0 else torch.ones(batch, length, dtype=_noise_dtype(weight),
                                                              device=self.device)
        self.global_steps = self.local_steps = 0

    def draw_noise(self, images: int, generator) -> torch.Tensor | None:
        """The sampling noise of ``images`` new images, [images, T] (None when greedy): column t of image i is
        the uniform of its token t, drawn from ``generator`` position-major (as one draw per token would)."""
        length = self.model.config.tokens_per_image
        noise = gen._noise(self.model, images * length, self.temperature, generator)
        return None if noise is None else noise.view(length, images).t()

    @torch.no_grad()
    def load(self, slots: torch.Tensor | None, labels: torch.Tensor, noise: torch.Tensor | None) -> None:
        """Starts new images in ``slots`` (int64 [n], distinct; None: every slot) with class ``labels`` (int64 [n])
        and sampling ``noise`` [n, T] (draw_noise): resets their caches and bookkeeping and runs their class-token
        global step."""
        model, every = self.model, slots is None
        if every:
            slots = torch.arange(self.batch, device=self.device)
        row_slots = slots if self.rows == self.batch else torch.cat([slots, slots + self.batch])
        row_labels = labels if self.rows == self.batch else model.class_embed.with_null(labels)
        for cache in (self.encoder_cache, self.global_cache, self.decoder_cache):
            cache.lengths[row_slots] = 0
        if self.entropy_cache is not None:
            self.entropy_cache.lengths[slots] = 0
        images = self.images
        images.position[slots], images.start[slots], images.waiting[slots] = 0, 0, False
        images.boundary[slots] = False
        images.boundary[slots, 0] = True
        if self.noise is not None:
            self.noise[slots] = noise.to(self.noise.dtype)
        self.global_cache.begin(None if every else row_slots)
        out = model.run_global(model.class_embed(row_labels), torch.zeros(row_slots.numel(), 3, dtype=torch.long,
                                                                          device=self.device), cache=self.global_cache)
        self.global_cache.commit()
        self.condition[row_slots] = model.decoder_condition(out)
        self.previous[row_slots] = model.decoder_start.to(self.previous.dtype)

    @torch.no_grad()
    def step(self) -> int:
        """One scheduling step; returns how many images were unfinished before it (0: nothing ran)."""
        waiting, unfinished = self.images.summary()
        if not unfinished:
            return 0
        if waiting and (waiting == unfinished or self.policy.run_global(waiting, unfinished)):
            self._append_patches(self.model, self.global_cache, self.condition, self.states, self.images,
                                 self.max_patch_size, self.rows)
            self.images.close_waiting()
            self.global_steps += 1
        self.previous = self._step(self.model, self.decoder_cache, self.encoder_cache, self.entropy_model,
                                   self.entropy_cache, self.images, self.previous, self.condition, self.noise,
                                   self.tokens, self.states, self.batch, self.cfg_scale, self.sampling)
        self.local_steps += 1
        return unfinished

    @torch.no_grad()
    def run(self) -> tuple[torch.Tensor, PatchBatch]:
        """Steps until every slot is finished -> (tokens int64 [batch, T], PatchBatch of the patches used)."""
        while self.step():
            pass
        return self.tokens, self.images.patch_batch()


def _noise_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _dpar_step(model, decoder_cache, encoder_cache, entropy_model, entropy_cache, images, previous, condition,
               noise, tokens, states, batch: int, cfg_scale: float, sampling: dict):
    """One local step of every row, appended for the active images (images.active()) at their own positions:
    previous [rows, D] (encoder state of each row's previous token), condition [rows, layers*D], noise [batch, T]
    or None (greedy). Writes the sampled tokens into tokens [batch, T] and the encoder states into states
    [rows, T, D], moves the images on (images.advance) and returns the new previous [rows, D]."""
    active = images.active()
    rows = previous.shape[0]
    row_active = gen._repeat_rows(active, rows)
    image_noise = None if noise is None else noise.gather(1, images.slot()[:, None])
    rope = model.token_rope(grid_positions(decoder_cache.lengths, model.config.grid_width), previous.dtype)
    decoder_cache.begin(active=row_active)
    logits = model.decode(previous, condition, rope, cache=decoder_cache)
    decoder_cache.commit()
    token = gen._next_tokens(logits, batch, cfg_scale, dict(sampling, noise=image_noise))
    encoder_cache.begin(active=row_active)
    state = model.encoder(model.token_embed(gen._repeat_rows(token, rows)), rope, cache=encoder_cache)
    encoder_cache.commit()
    entropy = None if entropy_cache is None else entropy_model.step(entropy_cache, token, active)
    images.write(tokens, token, active)
    images.write(states, state, active)
    images.advance(active, entropy)
    return torch.where(row_active[:, None], state, previous)


def _append_patches(model, global_cache, condition, states, images, max_patch_size: int, rows: int):
    """One cached global step over every row, appended for the waiting images (and their CFG twins): embeds their
    closed patches [start, position) and stores their new decoder conditions in ``condition`` (in place). Patches
    are padded to ``max_patch_size`` tokens by repeating their last token. Static shapes: each row is computed at
    the same place of the same-sized batch whichever images wait, so every schedule gives it the same rounding; no
    host read."""
    waiting = gen._repeat_rows(images.waiting, rows)
    starts = gen._repeat_rows(images.start, rows)
    ends = gen._repeat_rows(images.position, rows)
    lengths = (ends - starts).clamp(min=1)  # rows that do not wait: any valid patch, their output is discarded
    offsets = torch.arange(max_patch_size, device=states.device)
    token = torch.minimum(starts[:, None] + offsets, starts[:, None] + lengths[:, None] - 1)  # [rows, max size]
    row = torch.arange(rows, device=states.device)[:, None]
    vectors = model.embed_padded_patches(states[row, token.clamp(max=states.shape[1] - 1)], lengths.to(torch.int32))
    grid_width = model.config.grid_width
    positions = torch.stack([starts // grid_width, starts % grid_width, starts % grid_width + lengths - 1], dim=1)
    global_cache.begin(active=waiting)
    out = model.run_global(vectors, positions, cache=global_cache)
    global_cache.commit()
    condition.copy_(torch.where(waiting[:, None], model.decoder_condition(out), condition))
