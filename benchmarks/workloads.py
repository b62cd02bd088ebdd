"""Workloads shared by the end-to-end and scaling benchmarks: model sizes per mode, structured synthetic token
grids, a briefly trained entropy model, patch batches at a ~2x token reduction, and a timed training step.

QUICK (env DPAR_BENCH_QUICK=1) picks tiny sizes that run in seconds; the full mode a "small" CPU-sized model.
"""
import os
from dataclasses import dataclass

import torch

import dpar
import dpar_kernels as dk
from dpar_kernels import _dispatch

QUICK = os.environ.get("DPAR_BENCH_QUICK") == "1"
FLAT_CODES = 16  # flat regions use these few codes (like the smooth-area codes of a VQ codebook)
MAX_PATCH_SIZE = 4
TARGET_REDUCTION = 2.0  # tokens per patch the threshold is chosen for (paper: 1.81x at 256px)


@dataclass(frozen=True)
class Sizes:
    """Model sizes, batch and round counts of one mode."""
    width: int
    heads: int
    layers: tuple[int, int, int]  # encoder, global, decoder
    vocab: int
    grid: int  # the e2e grid is grid x grid tokens
    batch: int
    rounds: int
    entropy_steps: int
    scaling_grids: tuple[int, ...]
    scaling_batch: int
    sampling_grid: int
    sampling_batch: int


SIZES = (Sizes(width=64, heads=2, layers=(1, 2, 1), vocab=256, grid=8, batch=2, rounds=1, entropy_steps=10,
               scaling_grids=(8, 16), scaling_batch=1, sampling_grid=4, sampling_batch=1) if QUICK else
         Sizes(width=256, heads=4, layers=(1, 4, 2), vocab=4096, grid=16, batch=8, rounds=3, entropy_steps=30,
               scaling_grids=(16, 24, 32, 64), scaling_batch=1, sampling_grid=16,
               sampling_batch=1))


def kernel_backend() -> str:
    """The backend the dk ops pick for CPU tensors here (DPAR_BACKEND or the default)."""
    return _dispatch.resolve_backend("varlen_attention", None, torch.device("cpu"), ("torch", "cpu"))


def model_config(grid: int) -> dpar.ModelConfig:
    s = SIZES
    return dpar.get_config("B", vocab_size=s.vocab, grid_height=grid, grid_width=grid, width=s.width,
                           num_heads=s.heads, num_kv_heads=s.heads, encoder_layers=s.layers[0],
                           global_layers=s.layers[1], decoder_layers=s.layers[2])


def structured_grids(images: int, grid: int, vocab: int, generator: torch.Generator,
                     mean_run: float = 4.0, flat_fraction: float = 0.6) -> torch.Tensor:
    """int64 [images, grid*grid] raster token grids: each row is cut into runs (mean length ``mean_run``);
    a run is flat (one of FLAT_CODES codes repeated, predictable) or textured (uniform random other codes)."""
    tokens = grid * grid
    starts = torch.rand(images, tokens, generator=generator) < 1.0 / mean_run
    starts[:, ::grid] = True
    run = starts.long().cumsum(1) - 1
    flat = torch.rand(images, tokens, generator=generator) < flat_fraction
    flat_code = torch.randint(0, FLAT_CODES, (images, tokens), generator=generator)
    texture = torch.randint(FLAT_CODES, vocab, (images, tokens), generator=generator)
    return torch.where(flat.gather(1, run), flat_code.gather(1, run), texture)


def entropy_config(grid: int):
    return dpar.get_config("entropy", vocab_size=SIZES.vocab, grid_height=grid, grid_width=grid,
                           width=64, num_heads=2, num_kv_heads=2, layers=1, mlp_multiple_of=64)


def train_entropy_model(seed: int = 0) -> dpar.EntropyModel:
    """An EntropyModel briefly trained on structured grids of the e2e size (deterministic for a seed):
    it learns that flat codes repeat (low entropy) and textured codes do not (high entropy)."""
    torch.manual_seed(seed)
    model = dpar.EntropyModel(entropy_config(SIZES.grid))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(SIZES.entropy_steps):
        loss = model.loss(structured_grids(8, SIZES.grid, SIZES.vocab, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def entropy_model_for_grid(trained: dpar.EntropyModel, grid: int) -> dpar.EntropyModel:
    """The trained weights in a model for another grid size (RoPE is relative; parameter shapes are the same)."""
    model = dpar.EntropyModel(entropy_config(grid))
    model.load_state_dict(trained.state_dict())
    return model.eval()


def threshold_for_reduction(entropy: torch.Tensor, grid: int, reduction: float = TARGET_REDUCTION) -> float:
    """The entropy threshold (one of the observed values) whose patches come closest to ``reduction`` tokens
    per patch on ``entropy`` [B, T] (the patch count only falls as the threshold rises: bisection)."""
    candidates = entropy.flatten().double().unique()
    target = entropy.numel() / reduction

    def patches(i: int) -> int:
        lengths, _ = dk.entropy_patch_lengths(entropy, threshold=float(candidates[i]),
                                              max_patch_size=MAX_PATCH_SIZE, row_width=grid)
        return lengths.numel()

    low, high = 0, candidates.numel() - 1
    while low < high:
        middle = (low + high) // 2
        if patches(middle) > target:
            low = middle + 1
        else:
            high = middle
    best = min((i for i in (low - 1, low) if i >= 0), key=lambda i: abs(patches(i) - target))
    return float(candidates[best])


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [B, T]
    labels: torch.Tensor  # int64 [B]
    patches: dpar.PatchBatch
    threshold: float


def training_batch(entropy_model: dpar.EntropyModel, images: int, grid: int, seed: int) -> Batch:
    """Structured grids, labels, and their patches from the entropy model at a ~2x reduction threshold."""
    generator = torch.Generator().manual_seed(seed)
    tokens = structured_grids(images, grid, SIZES.vocab, generator)
    labels = torch.randint(0, 1000, (images,), generator=generator)
    threshold = threshold_for_reduction(entropy_model.entropies(tokens), grid)
    return Batch(tokens, labels, dpar.Patcher(entropy_model, threshold, MAX_PATCH_SIZE)(tokens), threshold)


def new_model(kind: str, grid: int, seed: int = 0):
    """A freshly initialised DPAR ("dpar") or LlamaGenBaseline ("baseline") in train mode with its AdamW."""
    torch.manual_seed(seed)
    model = (dpar.DPAR if kind == "dpar" else dpar.LlamaGenBaseline)(model_config(grid)).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def training_step(model, optimizer, batch: Batch):
    """A closure running one forward + backward + AdamW step."""
    def step():
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch.tokens, batch.labels, batch.patches).backward()
        optimizer.step()
    return step


def training_flops(kind: str, grid: int, batch: Batch) -> dict:
    config = model_config(grid)
    if kind == "dpar":
        return dpar.flops.dpar_training_flops(config, batch.patches)
    return dpar.flops.baseline_training_flops(config, batch.tokens.shape[0])


def mean_time(benchmark) -> float | None:
    """Mean seconds of a finished pytest-benchmark run (None when benchmarking is disabled)."""
    return None if benchmark.stats is None else benchmark.stats.stats.mean
