"""Batched sampling with KV caches: O(T) incremental steps per image, never a full recomputation per token.

Classifier-free guidance doubles the batch: rows [0, B) carry the labels, rows [B, 2B) the null class; both
rows of a pair receive the same sampled token and share patch boundaries.

Host reads: the baseline reads no tensor value per token; DPAR (dpar_sampler.DparSampler) reads one small tensor
per scheduling step (which images wait for the global step, which are unfinished), so that the schedule
(schedule.py: lockstep or out of step) decides on the host whether the global step runs. Everything else, patch
bookkeeping included, stays on the device.

The per-token step (the baseline's whole model.run; DPAR's decoder step + sampling + encoder step + entropy step)
is one function of tensors and caches, with the positions taken from the cache lengths on the device (no Python
int), so ``compile=True`` runs it as one torch.compile graph (fullgraph) that never recompiles across tokens; so is
DPAR's global step (static shapes; where DPAR's steps are gathered, dpar_sampler.gathers_rows, dynamic row counts, and
dynamo compiles one more graph for a step over a single image).
The sampling noise is drawn eagerly from the generator (sampling.sampling_noise), so compiled and eager runs give the
same tokens. Measured speeds: benchmarks/results/ (sampling_* files).
"""
import functools

import torch

from dpar_kernels.patching import thresholds

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


def _step_function(step, compile, dynamic: bool | None = False):
    """``step`` itself (compile False, the default) or its compiled version (compile True: torch.compile's default
    mode, inductor; a str: that torch.compile mode, e.g. "reduce-overhead" for CUDA graphs). ``dynamic``: that of
    torch.compile (False: static shapes; None: a size becomes dynamic once it changes, the others stay static).

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
def _compiled(step, mode, dynamic: bool | None):
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


def _thresholds(threshold, batch: int, device) -> torch.Tensor:
    """float or [B] tensor (checked by dk.patching.thresholds) -> float64 [B] on ``device``."""
    checked = thresholds(threshold, batch)
    if isinstance(checked, torch.Tensor):
        return checked.to(device)
    return torch.full((batch,), checked, dtype=torch.float64, device=device)


@torch.no_grad()
def generate_dpar(model, class_labels, *, entropy_model, threshold, max_patch_size: int, cfg_scale=1.0,
                  temperature=1.0, top_k=None, top_p=None, generator=None, schedule="out_of_step",
                  compile=False) -> tuple[torch.Tensor, PatchBatch]:
    """DPAR sampling with patch boundaries decided online from the entropy model (dpar_sampler.DparSampler).

    ``schedule``: "out_of_step" (each image at its own token, the global step when enough images wait), "lockstep"
    (every image at the same token, the global step at every token some image closes a patch) or a
    schedule.WaitFraction; the tokens are the same (the noise of token t of image b is the b-th of the t-th
    [B] draw from ``generator``). Returns tokens int64 [B, H*W] and the PatchBatch of the patches used.
    ``compile``: see _step_function (same tokens).
    """
    from .dpar_sampler import DparSampler

    labels = _labels(model, class_labels, cfg_scale)
    batch = labels.numel() if cfg_scale == 1.0 else labels.numel() // 2
    sampler = DparSampler(model, batch, entropy_model=entropy_model, threshold=threshold,
                          max_patch_size=max_patch_size, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                          top_p=top_p, schedule=schedule, compile=compile)
    sampler.load(None, labels[:batch], sampler.draw_noise(batch, generator))
    return sampler.run()
