"""DPAR's KV-cache sampler: a batch of image slots, each at its own token, scheduled by a policy (schedule.py).

A scheduling step reads one small tensor (schedule.ImageStates.read: how many images wait for the global step and
how many are unfinished, and for gathered steps which), then runs, if the policy says so, one cached global step
appended for the waiting images (their closed patches are embedded and appended to the global sequence), then one
local step appended for the active images: the decoder predicts each one's next token from the encoder state of its
previous token and the global output before its patch, the sampled token feeds the encoder and the entropy model.
Everything else, patch bookkeeping included, stays on the device.

Which rows a step computes is chosen in one place (``gathers_rows``): in float32 on a CPU a step computes only the
rows it serves (gathered by index), because there a step's cost grows with its rows (GEMMs of a few rows are
compute bound, the attention reads each row's cache), so the global step's total cost follows the number of
patches; elsewhere every step computes every row (static shapes: on a GPU one compiled graph per step, and a decode
step is bound by weight bandwidth, so rows cost little) and the rows that are not served append nothing. Either
way each row's arithmetic does not depend on which rows share the step: a static step computes every row at its
place in a batch of the same size, and a gathered one runs dk's float32 CPU kernels, which compute each row on its
own, on at most LINEAR_MAX_ROWS rows (above that, and in other dtypes, F.linear's BLAS may round a row differently
by the number of rows). So every schedule gives the same tokens.

Classifier-free guidance doubles the rows: rows [0, B) carry the labels, rows [B, 2B) the null class; both rows of
a pair receive the same sampled token and share patch boundaries. Slots can be reloaded with new images while the
others run (``load``: continuous batching).
"""
import torch

from dpar_kernels.constants import LINEAR_MAX_ROWS

from . import generation as gen
from .blocks import grid_positions
from .patcher import PatchBatch
from .sampling_args import check_sampling_args
from .schedule import ImageStates, schedule_policy


class DparSampler:
    """``batch`` image slots of a DPAR model; ``load`` starts images, ``step`` advances them, ``run`` finishes.

    tokens int64 [batch, T] holds each slot's tokens (valid up to its position); global_steps / local_steps count
    the scheduling steps that ran a global / local step (each over the rows that need it)."""

    def __init__(self, model, batch: int, *, entropy_model, threshold, max_patch_size: int, cfg_scale=1.0,
                 temperature=1.0, top_k=None, top_p=None, schedule="out_of_step", compile=False):
        check_sampling_args(cfg_scale=cfg_scale, temperature=temperature, threshold=threshold)
        c = model.config
        if isinstance(max_patch_size, bool) or not isinstance(max_patch_size, int) or max_patch_size < 1:
            raise ValueError(f"max_patch_size must be an int >= 1, got {max_patch_size!r}")
        if entropy_model.config.grid_width != c.grid_width or entropy_model.config.vocab_size != c.vocab_size:
            raise ValueError("entropy_model must share the model's grid width and vocabulary")
        self.model, self.entropy_model, self.batch, self.cfg_scale = model, entropy_model, batch, cfg_scale
        self.rows = batch if cfg_scale == 1.0 else 2 * batch
        self.temperature, self.sampling = temperature, dict(temperature=temperature, top_k=top_k, top_p=top_p)
        weight, length = model.head.weight, c.tokens_per_image
        self.device = weight.device
        thresholds = gen._thresholds(threshold, batch, self.device)
        entropy_needed = bool((thresholds < float("inf")).any())  # all +inf: fixed-size patches, no entropy model
        self.gathered = gathers_rows(self.device, weight.dtype)
        self.policy = schedule_policy(schedule, self.gathered)
        self.images_per_step = max(1, LINEAR_MAX_ROWS * batch // self.rows)  # of a gathered step
        steps = (_gathered_local_step, _gathered_global_step) if self.gathered else (_local_step, _global_step)
        dynamic = None if self.gathered else False  # gathered: dynamo makes the row count dynamic once it changes
        self._local_step, self._global_step = (gen._step_function(f, compile, dynamic) for f in steps)
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
        self.keys_values = torch.zeros(self.rows, length, 2, c.num_kv_heads, c.head_dim, dtype=weight.dtype,
                                       device=self.device)  # the patch refiner's, of each token
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
        if slots is None:
            slots = torch.arange(self.batch, device=self.device)
        for cache in (self.encoder_cache, self.global_cache, self.decoder_cache):
            cache.lengths[_rows_of(slots, self.batch, self.rows)] = 0
        if self.entropy_cache is not None:
            self.entropy_cache.lengths[slots] = 0
        images = self.images
        images.position[slots], images.start[slots], images.waiting[slots] = 0, 0, False
        images.boundary[slots] = False
        images.boundary[slots, 0] = True
        if self.noise is not None:
            self.noise[slots] = noise.to(self.noise.dtype)
        for part, part_labels in zip(slots.split(self.images_per_step), labels.split(self.images_per_step)):
            self._class_step(part, part_labels)

    def _class_step(self, slots: torch.Tensor, labels: torch.Tensor) -> None:
        """The class-token global step of the images just loaded in ``slots``."""
        model, rows = self.model, _rows_of(slots, self.batch, self.rows)
        row_labels = labels if self.rows == self.batch else model.class_embed.with_null(labels)
        self.global_cache.begin(rows)
        out = model.run_global(model.class_embed(row_labels), torch.zeros(rows.numel(), 3, dtype=torch.long,
                                                                          device=self.device), cache=self.global_cache)
        self.global_cache.commit()
        self.condition[rows] = model.decoder_condition(out)
        self.previous[rows] = model.decoder_start.to(self.previous.dtype)

    @torch.no_grad()
    def step(self) -> int:
        """One scheduling step; returns how many images were unfinished before it (0: nothing ran)."""
        waits, left, waiting, unfinished = self.images.read(self.gathered)
        if not left:
            return 0
        run_global = waits > 0 and (waits == left or self.policy.run_global(waits, left))
        model, images = self.model, self.images
        if run_global:
            for slots in self._gathered(waiting):
                self._global_step(model, self.global_cache, self.condition, self.states, self.keys_values, images,
                                  self.max_patch_size, slots, self.batch)
            images.close_waiting()
            self.global_steps += 1
        active = None if waiting is None else [u and (run_global or not w) for w, u in zip(waiting, unfinished)]
        for slots in self._gathered(active):
            self.previous = self._local_step(
                model, self.decoder_cache, self.encoder_cache, self.entropy_model, self.entropy_cache, images,
                self.previous, self.condition, self.noise, self.tokens, self.states, self.keys_values, slots,
                self.batch, self.cfg_scale, self.sampling)
        self.local_steps += 1
        return left

    def _gathered(self, flags: list[bool] | None) -> list[torch.Tensor | None]:
        """The slot sets (int64 [n <= images_per_step]) of a gathered step over the flagged images; [None] (one step
        over every row) when steps are not gathered (flags None)."""
        if flags is None:
            return [None]
        return list(torch.tensor([b for b, f in enumerate(flags) if f], device=self.device)
                    .split(self.images_per_step))

    @torch.no_grad()
    def run(self) -> tuple[torch.Tensor, PatchBatch]:
        """Steps until every slot is finished -> (tokens int64 [batch, T], PatchBatch of the patches used)."""
        while self.step():
            pass
        return self.tokens, self.images.patch_batch()


def gathers_rows(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether DPAR's sampling steps compute only the rows they serve (float32 on a CPU) or every row (static
    shapes, elsewhere); see the module docstring."""
    return device.type == "cpu" and dtype == torch.float32


def _rows_of(slots: torch.Tensor, batch: int, rows: int) -> torch.Tensor:
    """int64 [n] slots of ``batch`` images -> their rows among ``rows`` (with their CFG twins when rows = 2 batch)."""
    return slots if rows == batch else torch.cat([slots, slots + batch])


def _noise_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _local_step(model, decoder_cache, encoder_cache, entropy_model, entropy_cache, images, previous, condition,
                noise, tokens, states, keys_values, slots: None, batch: int, cfg_scale: float, sampling: dict):
    """One local step of every row, appended for the active images (images.active()) at their own positions:
    previous [rows, D] (encoder state of each row's previous token), condition [rows, layers*D], noise [batch, T]
    or None (greedy). Writes the sampled tokens into tokens [batch, T], the encoder states into states [rows, T, D]
    and their refiner keys and values into keys_values [rows, T, 2, Hk, d], moves the images on (images.advance)
    and returns the new previous [rows, D]. ``slots`` is None (the signature of _gathered_local_step)."""
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
    images.write(keys_values, model.refiner.token_keys_values(state), active)
    images.advance(active, entropy)
    return torch.where(row_active[:, None], state, previous)


def _gathered_local_step(model, decoder_cache, encoder_cache, entropy_model, entropy_cache, images, previous,
                         condition, noise, tokens, states, keys_values, slots, batch: int, cfg_scale: float,
                         sampling: dict):
    """_local_step over the rows of the active images ``slots`` (int64 [n]) only; updates previous in place and
    returns it."""
    rows = _rows_of(slots, batch, previous.shape[0])
    position = images.position.index_select(0, slots)
    row_position = gen._repeat_rows(position, rows.numel())
    image_noise = None if noise is None else noise[slots, position].unsqueeze(1)
    rope = model.token_rope(grid_positions(row_position, model.config.grid_width), previous.dtype)
    decoder_cache.begin(rows)
    logits = model.decode(previous.index_select(0, rows), condition.index_select(0, rows), rope, cache=decoder_cache)
    decoder_cache.commit()
    token = gen._next_tokens(logits, slots.numel(), cfg_scale, dict(sampling, noise=image_noise))
    encoder_cache.begin(rows)
    state = model.encoder(model.token_embed(gen._repeat_rows(token, rows.numel())), rope, cache=encoder_cache)
    encoder_cache.commit()
    entropy = None if entropy_cache is None else entropy_model.step(entropy_cache, token, rows=slots)
    tokens[slots, position] = token
    states[rows, row_position] = state
    keys_values[rows, row_position] = model.refiner.token_keys_values(state)
    active = torch.zeros_like(images.waiting).index_fill_(0, slots, True)
    images.advance(active, None if entropy is None else entropy.new_zeros(batch).index_copy_(0, slots, entropy))
    return previous.index_copy_(0, rows, state)


def _padded_patches(model, states, keys_values, rows, starts, lengths, max_patch_size: int):
    """The patches [start, start + length) of ``rows`` (int64 [n] each) -> (patch vectors [n, D], positions int64
    [n, 3]): padded to ``max_patch_size`` tokens by repeating their last token."""
    offsets = torch.arange(max_patch_size, device=states.device)
    token = torch.minimum(starts[:, None] + offsets, starts[:, None] + lengths[:, None] - 1)  # [n, max size]
    token = token.clamp(max=states.shape[1] - 1)
    row = rows[:, None]
    vectors = model.embed_padded_patches(states[row, token], keys_values[row, token], lengths.to(torch.int32))
    grid_width = model.config.grid_width
    positions = torch.stack([starts // grid_width, starts % grid_width, starts % grid_width + lengths - 1], dim=1)
    return vectors, positions


def _global_step(model, global_cache, condition, states, keys_values, images, max_patch_size: int, slots: None,
                 batch: int):
    """One cached global step over every row, appended for the waiting images (and their CFG twins): embeds their
    closed patches [start, position) and stores their new decoder conditions in ``condition`` (in place). Static
    shapes, no host read. ``slots`` is None (the signature of _gathered_global_step)."""
    rows = condition.shape[0]
    waiting = gen._repeat_rows(images.waiting, rows)
    starts = gen._repeat_rows(images.start, rows)
    lengths = (gen._repeat_rows(images.position, rows) - starts).clamp(min=1)  # rows that do not wait: any patch
    vectors, positions = _padded_patches(model, states, keys_values, torch.arange(rows, device=states.device),
                                         starts, lengths, max_patch_size)
    global_cache.begin(active=waiting)
    out = model.run_global(vectors, positions, cache=global_cache)
    global_cache.commit()
    condition.copy_(torch.where(waiting[:, None], model.decoder_condition(out), condition))


def _gathered_global_step(model, global_cache, condition, states, keys_values, images, max_patch_size: int, slots,
                          batch: int):
    """_global_step over the rows of the waiting images ``slots`` (int64 [n]) only."""
    rows = _rows_of(slots, batch, condition.shape[0])
    starts = gen._repeat_rows(images.start.index_select(0, slots), rows.numel())
    lengths = gen._repeat_rows(images.position.index_select(0, slots), rows.numel()) - starts
    vectors, positions = _padded_patches(model, states, keys_values, rows, starts, lengths, max_patch_size)
    global_cache.begin(rows)
    out = model.run_global(vectors, positions, cache=global_cache)
    global_cache.commit()
    condition.index_copy_(0, rows, model.decoder_condition(out))
