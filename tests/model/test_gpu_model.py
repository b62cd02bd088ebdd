"""Model level on the GPU: one bf16-autocast training step of each model and a short sampling run, every backend.

dk.set_default_backend (what DPAR_BACKEND sets at import) forces the backend of every dpar_kernels op the models
call. Head dims are 32 (a kernel head dim), so the cuda/triton kernels run rather than the torch fallback. Marked
``gpu``; DPAR_GPU_TESTS_DEVICE=cpu is the CPU dry run of tests/ops/test_gpu_kernels.py (Triton interpreted, float32
instead of bf16 autocast, the cuda backend skipped).
"""
import contextlib
import math

import pytest
import torch
from helpers import GPU_BACKENDS, GPU_DEVICE, GPU_DRY_RUN, GPU_MARKS
from model_utils import random_batch

import dpar

DEVICE, DRY_RUN = GPU_DEVICE, GPU_DRY_RUN
pytestmark = GPU_MARKS
MODELS = ("entropy", "dpar", "baseline")


@pytest.fixture(params=GPU_BACKENDS)
def backend(request, default_backend):
    if DRY_RUN and request.param == "cuda":
        pytest.skip("dry run on CPU: the cuda backend needs a GPU")
    default_backend(request.param)
    return request.param


def gpu_models(seed: int = 0):
    """(config, DPAR, LlamaGenBaseline, EntropyModel) in float32 on DEVICE, head dim 32, GQA in DPAR/baseline."""
    torch.manual_seed(seed)
    config = dpar.get_config("tiny", num_heads=2, num_kv_heads=1, class_dropout=0.0)
    entropy_config = dpar.get_config("entropy-tiny", vocab_size=config.vocab_size, grid_height=config.grid_height,
                                     grid_width=config.grid_width, num_heads=2, num_kv_heads=2)
    models = (dpar.DPAR(config), dpar.LlamaGenBaseline(config), dpar.EntropyModel(entropy_config))
    assert config.head_dim == entropy_config.head_dim == 32
    return (config, *(m.to(DEVICE) for m in models))


def autocast():
    """bf16 autocast on the GPU; none in the dry run (the Triton interpreter mishandles bf16)."""
    return contextlib.nullcontext() if DRY_RUN else torch.autocast("cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gpu(backend, name):
    config, dpar_model, baseline, entropy_model = gpu_models()
    tokens, labels, patches, _ = random_batch(config, images=4, max_len=4, seed=3)
    tokens, labels, patches = tokens.to(DEVICE), labels.to(DEVICE), patches.to(DEVICE)
    model, loss_of = {"dpar": (dpar_model, lambda: dpar_model.loss(tokens, labels, patches)),
                      "baseline": (baseline, lambda: baseline.loss(tokens, labels)),
                      "entropy": (entropy_model, lambda: entropy_model.loss(tokens))}[name]
    model.train()
    with torch.no_grad():
        full = loss_of()  # float32 on the same backend
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with autocast():
        loss = loss_of()
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(config.vocab_size)) < 0.5
    assert abs(loss.item() - full.item()) < 2e-2 * full.item(), (loss.item(), full.item())
    for param_name, param in model.named_parameters():
        if param.grad is None:
            assert param_name == "class_embed.embed.weight" or not param.requires_grad, param_name
            continue
        assert torch.isfinite(param.grad).all(), param_name
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_sampling_gpu(backend):
    config, dpar_model, baseline, entropy_model = gpu_models(seed=1)
    labels = torch.tensor([0, 3, 7], device=DEVICE)
    with torch.no_grad():
        entropies = entropy_model.eval().entropies(torch.randint(0, config.vocab_size, (4, config.tokens_per_image),
                                                                 device=DEVICE))
        threshold = float(entropies.double().median())  # patches of mixed lengths
        runs = [dpar_model.eval().generate(labels, entropy_model=entropy_model, threshold=threshold,
                                           max_patch_size=3, cfg_scale=2.0, temperature=1.0, top_k=20,
                                           generator=torch.Generator(DEVICE).manual_seed(5), return_patches=True)
                for _ in range(2)]
        base = baseline.eval().generate(labels, cfg_scale=2.0, temperature=0.9, top_p=0.8,
                                        generator=torch.Generator(DEVICE).manual_seed(5))
    (tokens, patches), (again, _) = runs
    for grid in (tokens, base):
        assert grid.shape == (3, config.tokens_per_image) and grid.device.type == DEVICE.type
        assert grid.dtype == torch.long and bool(((grid >= 0) & (grid < config.vocab_size)).all())
    assert torch.equal(tokens, again), "same generator seed, same tokens (the kernels are deterministic)"
    lengths = patches.patch_lengths.cpu()
    assert int(lengths.sum()) == 3 * config.tokens_per_image and int(lengths.max()) <= 3
