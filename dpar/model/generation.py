"""Batched sampling with KV caches: O(T) incremental steps per image, never a full recomputation per token.

Classifier-free guidance doubles the batch: rows [0, B) carry the labels, rows [B, 2B) the null class; both
rows of a pair receive the same sampled token and share patch boundaries.

Host reads: the baseline reads no tensor value per token; DPAR reads one small tensor per token (how many images
start a patch and the longest such patch), so that the global step runs only when some image starts a patch and
for those images only. Everything else, patch bookkeeping included, stays on the device.

The per-token step (the baseline's whole model.run; DPAR's decoder step + sampling + encoder step + entropy step)
is one function of tensors and caches, with the position taken from the cache lengths on the device (no Python
int), so ``compile=True`` runs it as one torch.compile graph (fullgraph, static shapes) that never recompiles across
tokens. Its sampling noise is drawn eagerly from the generator (sampling.sampling_noise), so compiled and eager
runs give the same tokens. DPAR's global step (a data-dependent number of rows and patch length) compiles with
dynamic shapes into a few graphs, one per specialization (all images or some, one image, one-token patches).
Measured speeds of both: benchmarks/RESULTS.md (sampling rows; data in benchmarks/results/).
"""
import functools

import torch

from dpar_kernels.patching import next_patch_starts, thresholds

from .blocks import grid_positions
from .kv_cache import KVCache
from .patcher import PatchBatch
from .sampling import guided_logits, sample_logits, sampling_noise
from .sampling_args import check_sampling_args


def _labels(model, class_labels, cfg_scale: float) -> torch.Tensor:
    """class_labels int [B] -> the labels of every row (doubled with the null class when cfg_scale != 1)."""
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=model.head.weight.device)
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError("class_labels must be a non-empty 1-D sequence of class indices")
    if int(labels.min()) < 0 or int(labels.max()) > model.config.num_classes:
        raise ValueError(f"class_labels must be in [0, {model.config.num_classes}]")
    return model.class_embed.with_null(labels) if cfg_scale != 1.0 else labels


def _cache(model, layers: int, rows: int, capacity: int) -> KVCache:
    c, weight = model.config, model.head.weight
    return KVCache(layers, rows, capacity, c.num_kv_heads, c.head_dim, weight.dtype, weight.device)


def _next_tokens(logits, batch: int, cfg_scale: float, sampling: dict) -> torch.Tensor:
    """logits [rows, V] -> sampled tokens [batch] (guided when the rows are doubled)."""
    if logits.shape[0] != batch:
        logits = guided_logits(logits, cfg_scale)
    return sample_logits(logits, **sampling)


def _repeat_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x])


def _step_function(step, compile, dynamic: bool = False):
    """``step`` itself (compile False, the default) or its compiled version (compile True: torch.compile's default
    mode, inductor; a str: that torch.compile mode, e.g. "reduce-overhead" for CUDA graphs).

    Compiled sampling is faster per image once compiled, but each graph first pays inductor's compile time, so
    compile stays off by default (``python -m benchmarks.bench_sampling`` measures both; benchmarks/RESULTS.md).
    "reduce-overhead" (CUDA graphs) is not run on a GPU: the caches are fresh tensors mutated in place, which CUDA
    graph trees may refuse to capture."""
    if compile is False:
        return step
    if compile is True or isinstance(compile, str):
        return _compiled(step, None if compile is True else compile, dynamic)
    raise TypeError(f"compile must be a bool or a torch.compile mode string, got {type(compile).__name__}")


@functools.cache
def _compiled(step, mode, dynamic: bool):
    """One compiled wrapper per (step, mode), so later generate calls reuse its graphs (the shapes of a call are
    fixed: rows, width, vocabulary; a new batch size compiles once more)."""
    return torch.compile(step, fullgraph=True, dynamic=dynamic, mode=mode)


def _noise(model, batch: int, temperature: float, generator):
    """The sampling noise of one token [batch, 1] (None when greedy), drawn eagerly from ``generator``."""
    weight = model.head.weight
    return sampling_noise(batch, temperature=temperature, dtype=weight.dtype, device=weight.device,
                          generator=generator)


def _baseline_step(model, cache, inputs, noise, batch: int, cfg_scale: float, sampling: dict):
    """One token of every row: inputs [rows, D] (class or previous token embeddings) -> (tokens int64 [batch],
    next inputs [rows, D]). The sequence position is the cache length (on the device)."""
    cache.begin()
    logits = model.run(inputs, cache.lengths.long(), cache=cache)
    cache.commit()
    token = _next_tokens(logits, batch, cfg_scale, dict(sampling, noise=noise))
    return token, model.token_embed(_repeat_rows(token, inputs.shape[0]))


@torch.no_grad()
def generate_baseline(model, class_labels, *, cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None,
                      generator=None, compile=False) -> torch.Tensor:
    """LlamaGenBaseline sampling -> tokens int64 [B, H*W]. ``compile``: see _step_function (same tokens)."""
    check_sampling_args(cfg_scale=cfg_scale, temperature=temperature)
    labels = _labels(model, class_labels, cfg_scale)
    rows, length = labels.numel(), model.config.tokens_per_image
    batch = rows if cfg_scale == 1.0 else rows // 2
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    step = _step_function(_baseline_step, compile)
    cache = _cache(model, model.config.total_layers, rows, length)
    tokens = torch.empty(batch, length, dtype=torch.long, device=labels.device)
    inputs = model.class_embed(labels)
    for t in range(length):
        tokens[:, t], inputs = step(model, cache, inputs, _noise(model, batch, temperature, generator), batch,
                                    cfg_scale, sampling)
    return tokens


class _OpenPatches:
    """Device bookkeeping of the patch each image is filling: its start token, and every patch start so far."""

    def __init__(self, batch: int, length: int, max_patch_size: int, grid_width: int, device):
        self.start = torch.zeros(batch, dtype=torch.long, device=device)
        self.boundary = torch.zeros(batch, length, dtype=torch.bool, device=device)  # token t starts a patch
        self.boundary[:, 0] = True
        self.max_patch_size, self.grid_width = max_patch_size, grid_width

    def starts_at(self, t: int, previous_entropy: torch.Tensor, threshold) -> torch.Tensor:
        """bool [B]: token t starts a new patch (dk.entropy_patch_lengths' rules); previous_entropy None when every
        threshold is +inf (fixed-size patches)."""
        return next_patch_starts(t, previous_entropy, threshold, self.start, self.max_patch_size, self.grid_width)

    def summary(self, starting: torch.Tensor, t: int) -> tuple[int, int]:
        """The step's one host read: (images starting a patch at t, longest patch they close)."""
        count, longest = torch.stack([starting.sum(), torch.where(starting, t - self.start, 0).amax()]).tolist()
        return count, longest

    def close(self, starting: torch.Tensor, t: int) -> None:
        """Ends the open patch of the ``starting`` images before token t and opens one at t."""
        self.start = torch.where(starting, t, self.start)
        self.boundary[:, t] = starting

    def patch_batch(self) -> PatchBatch:
        """The PatchBatch of every patch (read once, after the last token)."""
        firsts = self.boundary.reshape(-1).nonzero().squeeze(1)
        lengths = torch.diff(firsts, append=firsts.new_full((1,), self.boundary.numel()))
        counts = self.boundary.sum(1)
        cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return PatchBatch.from_lengths(lengths, cu, self.grid_width)


def _thresholds(threshold, batch: int, device) -> torch.Tensor:
    """float or [B] tensor (checked by dk.patching.thresholds) -> float64 [B] on ``device``."""
    checked = thresholds(threshold, batch)
    if isinstance(checked, torch.Tensor):
        return checked.to(device)
    return torch.full((batch,), checked, dtype=torch.float64, device=device)


@torch.no_grad()
def generate_dpar(model, class_labels, *, entropy_model, threshold, max_patch_size: int, cfg_scale=1.0,
                  temperature=1.0, top_k=None, top_p=None, generator=None,
                  compile=False) -> tuple[torch.Tensor, PatchBatch]:
    """DPAR sampling with patch boundaries decided online from the entropy model.

    Per token t: if t starts a patch, the finished patches of those images are embedded and appended to the
    global sequence (one cached global step for just those rows); the decoder then predicts token t from the
    encoder state of token t-1 and the global output before t's patch; the sampled token feeds the encoder
    and the entropy model. Returns tokens int64 [B, H*W] and the PatchBatch of the patches used.
    ``compile``: see _step_function (same tokens; the global step compiles with dynamic shapes).
    """
    check_sampling_args(cfg_scale=cfg_scale, temperature=temperature, threshold=threshold)
    c = model.config
    if isinstance(max_patch_size, bool) or not isinstance(max_patch_size, int) or max_patch_size < 1:
        raise ValueError(f"max_patch_size must be an int >= 1, got {max_patch_size!r}")
    if entropy_model.config.grid_width != c.grid_width or entropy_model.config.vocab_size != c.vocab_size:
        raise ValueError("entropy_model must share the model's grid width and vocabulary")
    labels = _labels(model, class_labels, cfg_scale)
    rows, length, device = labels.numel(), c.tokens_per_image, labels.device
    batch = rows if cfg_scale == 1.0 else rows // 2
    thresholds = _thresholds(threshold, batch, device)
    entropy_needed = bool((thresholds < float("inf")).any())  # all +inf: fixed-size patches, no entropy model
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    step = _step_function(_dpar_step, compile)
    append_patches = _step_function(_append_patches, compile, dynamic=True)
    encoder_cache = _cache(model, c.encoder_layers, rows, length)
    global_cache = _cache(model, c.global_layers, rows, length + 1)
    decoder_cache = _cache(model, c.decoder_layers, rows, length)
    entropy_cache = entropy_model.new_cache(batch, device, entropy_model.head.weight.dtype) if entropy_needed else None

    global_cache.begin()
    class_out = model.run_global(model.class_embed(labels), torch.zeros(rows, 3, dtype=torch.long, device=device),
                                 cache=global_cache)
    global_cache.commit()
    condition = model.decoder_condition(class_out)  # [rows, layers*D]: condition of each row's open patch
    states = torch.empty(rows, length, c.width, dtype=condition.dtype, device=device)  # encoder outputs
    tokens = torch.empty(batch, length, dtype=torch.long, device=device)
    patches = _OpenPatches(batch, length, max_patch_size, c.grid_width, device)
    previous = model.decoder_start.to(states.dtype).repeat(rows, 1)  # encoder state before token 0
    entropy = None
    for t in range(length):
        if t > 0:
            starting = patches.starts_at(t, entropy, thresholds)
            count, longest = patches.summary(starting, t)
            if count:
                append_patches(model, global_cache, condition, states, starting, patches.start, count, longest, t,
                               batch, rows)
                patches.close(starting, t)
        tokens[:, t], previous, entropy = step(model, decoder_cache, encoder_cache, entropy_model, entropy_cache,
                                               previous, condition, _noise(model, batch, temperature, generator),
                                               batch, cfg_scale, sampling)
        states[:, t] = previous
    return tokens, patches.patch_batch()


def _dpar_step(model, decoder_cache, encoder_cache, entropy_model, entropy_cache, previous, condition, noise,
               batch: int, cfg_scale: float, sampling: dict):
    """Token t of every row: previous [rows, D] (encoder state of token t-1), condition [rows, layers*D] ->
    (tokens int64 [batch], encoder states of token t [rows, D], entropy float32 [batch] of the prediction of token
    t+1, or None without an entropy cache). The position t is the decoder cache's length (on the device)."""
    rope = model.token_rope(grid_positions(decoder_cache.lengths, model.config.grid_width), previous.dtype)
    decoder_cache.begin()
    logits = model.decode(previous, condition, rope, cache=decoder_cache)
    decoder_cache.commit()
    token = _next_tokens(logits, batch, cfg_scale, dict(sampling, noise=noise))
    encoder_cache.begin()
    state = model.encoder(model.token_embed(_repeat_rows(token, previous.shape[0])), rope, cache=encoder_cache)
    encoder_cache.commit()
    entropy = None if entropy_cache is None else entropy_model.step(entropy_cache, token)
    return token, state, entropy


def _append_patches(model, global_cache, condition, states, starting, start, count: int, longest: int, t: int,
                    batch: int, rows: int):
    """Embeds the patches [start, t) of the ``count`` images that start a patch at t (and their CFG twins), runs
    one cached global step for those rows and stores their new decoder conditions in ``condition`` (in place).
    Patches are padded to ``longest`` tokens by repeating their last token; no host read."""
    images = torch.nonzero_static(starting, size=count).squeeze(1)
    row_ids = images if rows == batch else torch.cat([images, images + batch])
    starts = _repeat_rows(start.index_select(0, images), row_ids.numel())
    lengths = t - starts
    token = (starts[:, None] + torch.arange(longest, device=states.device)).clamp(max=t - 1)  # [n, longest]
    vectors = model.embed_padded_patches(states[row_ids[:, None], token], lengths.to(torch.int32))
    grid_width = model.config.grid_width
    positions = torch.stack([starts // grid_width, starts % grid_width, starts % grid_width + lengths - 1], dim=1)
    every_row = count == batch  # then row_ids is arange(rows): a whole-batch step, nothing to scatter
    global_cache.begin(None if every_row else row_ids)
    out = model.run_global(vectors, positions, cache=global_cache)
    global_cache.commit()
    if every_row:
        condition.copy_(model.decoder_condition(out))
    else:
        condition[row_ids] = model.decoder_condition(out)
