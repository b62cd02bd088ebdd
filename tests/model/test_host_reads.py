"""No host reads in a training step, offsets validated once per tensor version, and kernels that stay in bounds
whatever the offsets say (validation skipped with dk.set_validation(False), as DPAR_VALIDATE=0 does at import).

Out-of-bounds reads are caught by NaN sentinels: the inputs are slices of NaN-filled buffers, so a kernel that
reads past its tensor's rows returns NaN. Triton runs in its interpreter on CPU tensors.
"""
import math

import pytest
import torch
from helpers import cpu_backends, cu_from_lengths
from model_utils import random_batch, single_thread, tiny_models  # noqa: F401

import dpar_kernels as dk
from dpar_kernels.testing import HostReadCounter


def _step(kind, model, tokens, labels, patches):
    loss = model.loss(tokens) if kind == "entropy" else model.loss(tokens, labels, patches)
    loss.backward()
    return loss


@pytest.mark.parametrize("kind", ["dpar", "baseline", "entropy"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_reads_nothing_back(kind, precision):
    config, dpar_model, baseline, entropy_model = tiny_models(torch.float32, seed=1)
    model = {"dpar": dpar_model, "baseline": baseline, "entropy": entropy_model}[kind].train()
    tokens, labels, patches, _ = random_batch(config, images=3, seed=2)  # the PatchBatch exists (host-built)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with HostReadCounter() as counter, autocast:
        loss = _step(kind, model, tokens, labels, patches)
    assert counter.count == 0, counter.calls
    assert math.isfinite(float(loss.detach()))


def test_the_counter_sees_forward_and_backward_reads():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            grad.sum().item()
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    with HostReadCounter() as counter:
        bool(x.sum() > 0)
        x.tolist()
        ReadsInBackward.apply(x).sum().backward()
    assert counter.calls == ["__bool__", "tolist", "aten._local_scalar_dense.default"]


def test_offsets_are_read_once_per_tensor_version():
    x = torch.randn(9, 4)
    cu = cu_from_lengths([2, 3, 4])
    with HostReadCounter() as first:
        dk.patch_gather(x, cu, reduce="sum", backend="torch")
    with HostReadCounter() as again:
        dk.patch_gather(x, cu, reduce="mean", backend="torch")
        dk.patch_scatter(torch.randn(3, 4), cu, total_tokens=9, backend="torch")
    assert first.count > 0 and again.count == 0, (first.calls, again.calls)
    cu[2] = 1  # a new version: checked again, and now rejected
    with pytest.raises(ValueError, match="non-decreasing"):
        dk.patch_gather(x, cu, backend="torch")
    with pytest.raises(ValueError, match="end at the total length 8"):  # the cached result still knows the end
        dk.patch_gather(x[:8], cu_from_lengths([2, 3, 4]), backend="torch")


def test_validation_can_be_switched_off(validation):
    validation(False)
    cu = cu_from_lengths([3, 5])
    q = torch.randn(8, 2, 32)
    with HostReadCounter() as counter:
        dk.varlen_attention(q, q, q, cu, cu, 5, 5, backend="torch")
    assert counter.count == 0, counter.calls


def _sentinel_rows(rows: int, *shape) -> torch.Tensor:
    """[rows, *shape] random values: a slice of a NaN buffer with 8 more rows (reads past the end give NaN)."""
    buffer = torch.full((rows + 8, *shape), float("nan"))
    buffer[:rows] = torch.randn(rows, *shape)
    return buffer[:rows]


LYING = {"past the end": [0, 3, 12], "negative start": [-4, 3, 8], "decreasing": [0, 6, 2]}


def _covered(cu: torch.Tensor, rows: int) -> torch.Tensor:
    """bool [rows]: the rows some segment [cu[p], cu[p+1]) (clamped into [0, rows]) covers. Rows no segment covers
    are never written with lying offsets, so they hold whatever the allocator handed out (possibly the NaN of a
    freed sentinel); only covered rows can show a read past the end."""
    ends = cu.long().clamp(0, rows)
    index = torch.arange(rows)
    return ((index[:, None] >= ends[:-1]) & (index[:, None] < ends[1:])).any(1)


def _survives(run) -> torch.Tensor | None:
    """run()'s result, or None when the backend refused the offsets with a Python exception (never a crash)."""
    try:
        return run()
    except (ValueError, RuntimeError, IndexError):
        return None


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offsets", LYING)
def test_lying_offsets_never_reach_out_of_bounds(backend, offsets, validation):
    validation(False)
    cu = torch.tensor(LYING[offsets], dtype=torch.int32)
    covered = _covered(cu, 8)
    x = _sentinel_rows(8, 16).requires_grad_(backend != "cpu")
    pooled = _survives(lambda: dk.patch_gather(x, cu, reduce="max", backend=backend))
    if pooled is not None:
        assert not pooled.isnan().any()
        if x.requires_grad:
            grad = _survives(lambda: torch.autograd.grad(pooled.sum(), x)[0])
            assert grad is None or not grad[covered].isnan().any()
    spread = _survives(lambda: dk.patch_scatter(_sentinel_rows(2, 16), cu, total_tokens=8, backend=backend))
    assert spread is None or not spread[covered].isnan().any()
    q, k, v = (_sentinel_rows(8, 2, 32).requires_grad_() for _ in range(3))
    out = _survives(lambda: dk.varlen_attention(q, k, v, cu, cu, 8, 8, backend=backend))
    if out is not None:
        assert not out[covered].isnan().any()
        grads = _survives(lambda: torch.autograd.grad(out.sum(), (q, k, v)))
        assert grads is None or not any(g[covered].isnan().any() for g in grads)


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_offsets_work_on_every_backend(backend):
    lengths = [3, 0, 1, 4]
    cu = cu_from_lengths(lengths)
    strided = torch.stack([cu, torch.full_like(cu, 99)], 1).reshape(-1)[::2]  # stride 2, same values
    assert strided.stride(0) == 2 and torch.equal(strided, cu)
    x, y = torch.randn(8, 16), torch.randn(4, 16)
    torch.testing.assert_close(dk.patch_gather(x, strided, backend=backend), dk.patch_gather(x, cu, backend="torch"))
    torch.testing.assert_close(dk.patch_scatter(y, strided, total_tokens=8, backend=backend),
                               dk.patch_scatter(y, cu, total_tokens=8, backend="torch"))
    q = torch.randn(8, 2, 32)
    torch.testing.assert_close(dk.varlen_attention(q, q, q, strided, strided, 4, 4, backend=backend),
                               dk.varlen_attention(q, q, q, cu, cu, 4, 4, backend="torch"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("validate", [True, False])
def test_an_oversized_max_seqlen_does_not_grow_the_launch(backend, validate, validation):
    """2**40 is a legal bound; the grid follows the validated longest sequence (or the total length)."""
    validation(validate)
    cu = cu_from_lengths([5, 3])
    q = torch.randn(8, 2, 32, requires_grad=True)
    out = dk.varlen_attention(q, q, q, cu, cu, 2 ** 40, 2 ** 40, backend=backend)
    expected = dk.varlen_attention(q, q, q, cu, cu, 5, 5, backend="torch")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.autograd.grad(out.sum(), q)
