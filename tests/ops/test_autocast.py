"""Mixed precision: every model trains under CPU bf16 autocast, and the ops cast mixed inputs instead of
rejecting them."""
import math

import pytest
import torch
from helpers import cu_from_lengths
from model_utils import random_batch, single_thread, tiny_models  # noqa: F401

import dpar_kernels as dk
from dpar.model.blocks import apply_rope


def _losses_and_grads(kind: str, model, tokens, labels, patches):
    """(fp32 loss, bf16-autocast loss, bf16 grads) of one step of ``model`` from the same weights."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = model.loss(tokens) if kind == "entropy" else model.loss(tokens, labels, patches)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    fp32_loss, _ = step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, grads = step()
    return fp32_loss, bf16_loss, grads


@pytest.mark.parametrize("kind", ["entropy", "dpar", "baseline"])
def test_one_bf16_autocast_step_tracks_fp32(kind):
    config, dpar_model, baseline, entropy_model = tiny_models(torch.float32, seed=3)
    model = {"dpar": dpar_model, "baseline": baseline, "entropy": entropy_model}[kind]
    tokens, labels, patches, _ = random_batch(config, images=2, seed=5)
    fp32_loss, bf16_loss, grads = _losses_and_grads(kind, model, tokens, labels, patches)
    assert fp32_loss.dtype == bf16_loss.dtype == torch.float32
    assert math.isfinite(float(bf16_loss))
    assert abs(float(bf16_loss) - float(fp32_loss)) <= 0.02 * abs(float(fp32_loss)), (bf16_loss, fp32_loss)
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_rope_rotates_in_fp32_and_keeps_the_input_dtype():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    angles = torch.randn(5, 4, dtype=torch.float64)
    exact = apply_rope(x, torch.polar(torch.ones_like(angles), angles))
    rotations = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    half = apply_rope(x.bfloat16(), rotations)
    assert half.dtype == torch.bfloat16
    # one bf16 rounding of the input and one of the output, no more
    assert (half.double() - exact).abs().max() <= 2 * 2 ** -8 * x.abs().max() * 2
    assert apply_rope(x, rotations).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attention_casts_mixed_inputs_under_autocast(dtype):
    torch.manual_seed(1)
    cu = cu_from_lengths([3, 0, 5])
    q, k = torch.randn(8, 2, 32), torch.randn(8, 2, 32)
    v = torch.randn(8, 2, 32).to(dtype)
    with pytest.raises(TypeError, match="share a dtype"):
        dk.varlen_attention(q, k, v, cu, cu, 5, 5)
    with torch.autocast("cpu", dtype=dtype):
        out = dk.varlen_attention(q, k, v, cu, cu, 5, 5, backend="torch")
        op_out, lse = torch.ops.dpar.varlen_attention(q, k, v, cu, cu, 5, 5, 32 ** -0.5, True, "torch")
    assert out.dtype == op_out.dtype == dtype and lse.dtype == torch.float32
    reference = dk.varlen_attention(q.to(dtype), k.to(dtype), v, cu, cu, 5, 5, backend="torch")
    assert torch.equal(out, reference) and torch.equal(op_out, reference)


def test_linear_entropy_casts_mixed_inputs_under_autocast():
    torch.manual_seed(2)
    hidden, weight = torch.randn(6, 16).bfloat16(), torch.randn(40, 16)
    with pytest.raises(TypeError, match="share a dtype"):
        dk.linear_entropy(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        entropy = dk.linear_entropy(hidden, weight)
    expected = dk.token_entropy(hidden.double() @ weight.bfloat16().double().T)
    assert entropy.dtype == torch.float32
    torch.testing.assert_close(entropy, expected, atol=1e-2, rtol=1e-2)


def test_float64_is_left_alone_under_autocast():
    cu = cu_from_lengths([4])
    q = torch.randn(4, 1, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dk.varlen_attention(q, q, q, cu, cu, 4, 4).dtype == torch.float64


@pytest.mark.parametrize("kind", ["entropy", "dpar", "baseline"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_runs_at_every_precision(tmp_path, kind, precision):
    from pipeline_helpers import train_args, write_random_dataset

    from dpar.pipeline import train
    from dpar.pipeline.patchify import PatchTable

    write_random_dataset(tmp_path / "data", count=8)
    extra = []
    if kind == "dpar":
        PatchTable.from_entropies(torch.rand(8, 16) * 3, 1.5, 4, 4).save(str(tmp_path / "patches.pt"))
        extra = ["--patches", tmp_path / "patches.pt"]
    records = train.train(train_args([kind, "--data", tmp_path / "data", "--out", tmp_path / "out", "--steps", 2,
                                      "--batch-size", 4, "--precision", precision, *extra]))
    assert len(records) == 2
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert abs(records[0]["loss"] - math.log(16)) < 0.5  # vocabulary 16: about chance at the first step


def test_dpar_with_on_the_fly_patches_trains_under_bf16(tmp_path):
    """The entropy model cutting the patches runs under the same autocast as the step."""
    from pipeline_helpers import train_args, write_random_dataset

    from dpar.pipeline import train

    write_random_dataset(tmp_path / "data", count=8)
    common = ["--data", tmp_path / "data", "--steps", 1, "--batch-size", 4, "--precision", "bf16"]
    train.train(train_args(["entropy", *common, "--out", tmp_path / "entropy"]))
    records = train.train(train_args(["dpar", *common, "--out", tmp_path / "dpar", "--threshold", 1.0,
                                      "--entropy-ckpt", tmp_path / "entropy" / train.CHECKPOINT]))
    assert math.isfinite(records[0]["loss"]) and 0 < records[0]["global_tokens"] <= 4 * 16


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch):
    """The GradScaler state is checkpointed: with a scale so large that every step overflows (skipped, scale
    halved), a resumed run goes on halving from the saved scale instead of restarting from the initial one."""
    from pipeline_helpers import train_args, write_random_dataset

    from dpar.pipeline import train

    def overflowing(precision, device):
        autocast, _ = precision_context(precision, device)
        return autocast, torch.amp.GradScaler(device.type, init_scale=2.0 ** 60, enabled=precision == "fp16")

    precision_context = train.precision_context
    monkeypatch.setattr(train, "precision_context", overflowing)
    write_random_dataset(tmp_path / "data", count=8)
    common = ["baseline", "--data", tmp_path / "data", "--out", tmp_path / "out", "--batch-size", 4,
              "--precision", "fp16"]
    first = train.train(train_args([*common, "--steps", 2]))
    assert [r["loss_scale"] for r in first] == [2.0 ** 59, 2.0 ** 58]  # both steps overflowed, and ran on
    resumed = train.train(train_args([*common, "--steps", 3, "--resume"]))
    assert resumed[-1]["loss_scale"] == 2.0 ** 57
