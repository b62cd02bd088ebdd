"""The padded torch ops of the end-to-end benchmark equal the dk ops (values and gradients), so the comparison
"DPAR with dpar_kernels vs DPAR on padded torch ops" compares the same computation."""
import pytest
import torch
from helpers import assert_close, cu_from_lengths
from model_utils import random_batch, single_thread, tiny_models  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

import dpar_kernels as dk
from benchmarks import padded_ops

DTYPES = [torch.float64, torch.float32]


def _grads(output, inputs, seed: int):
    """Gradients of <output, random cotangent> with respect to ``inputs``."""
    cotangent = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    return torch.autograd.grad(output, inputs, cotangent)


def _leaves(*shapes, dtype):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


ATTENTION_CASES = [  # (query lengths, key lengths or None for the same, heads q, heads kv, causal)
    pytest.param([5, 0, 1, 9, 3], None, 4, 4, True, id="self-causal-with-empty-and-single"),
    pytest.param([7, 2, 6], None, 4, 2, True, id="self-causal-gqa"),
    pytest.param([40], None, 2, 1, True, id="one-long-sequence-mqa"),
    pytest.param([1, 1, 1, 1], [3, 1, 4, 2], 4, 4, False, id="patch-cross-attention"),
    pytest.param([2, 0, 1, 0], [5, 6, 3, 8], 4, 2, True, id="kv-cache-bottom-right"),
    pytest.param([3, 2], [2, 0], 2, 2, True, id="queries-that-see-no-key"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths_q,lengths_k,heads_q,heads_k,causal", ATTENTION_CASES)
def test_padded_attention_equals_varlen_attention(lengths_q, lengths_k, heads_q, heads_k, causal, dtype):
    lengths_k = lengths_q if lengths_k is None else lengths_k
    cu_q, cu_k = cu_from_lengths(lengths_q), cu_from_lengths(lengths_k)
    head_dim = 32
    q, k, v = _leaves((sum(lengths_q), heads_q, head_dim), *[(sum(lengths_k), heads_k, head_dim)] * 2, dtype=dtype)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    expected = dk.varlen_attention(q, k, v, *args, causal=causal, softmax_scale=0.3, backend="torch")
    actual = padded_ops.varlen_attention(q, k, v, *args, causal=causal, softmax_scale=0.3)
    assert actual.shape == expected.shape and not actual.isnan().any()
    assert_close(actual, expected, dtype)
    for got, want in zip(_grads(actual, (q, k, v), 1), _grads(expected, (q, k, v), 1)):
        assert not got.isnan().any()
        assert_close(got, want, dtype)


def test_padded_attention_takes_strided_slices_and_padded_max_seqlen():
    """Slices of a fused qkv (as in dpar.model.blocks.Attention) and max_seqlen above the longest sequence."""
    lengths = [4, 7, 1]
    cu = cu_from_lengths(lengths)
    qkv = torch.randn(sum(lengths), 6, 32, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.split([2, 2, 2], dim=1)
    assert not q.is_contiguous()
    expected = dk.varlen_attention(q, k, v, cu, cu, 7, 7, backend="torch")
    actual = padded_ops.varlen_attention(q, k, v, cu, cu, 12, 9)
    assert_close(actual, expected, torch.float64)
    assert_close(_grads(actual, (qkv,), 2)[0], _grads(expected, (qkv,), 2)[0], torch.float64)


def test_padded_attention_rejects_return_lse():
    q = torch.randn(2, 1, 32)
    cu = cu_from_lengths([2])
    with pytest.raises(ValueError, match="return_lse"):
        padded_ops.varlen_attention(q, q, q, cu, cu, 2, 2, return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["max", "sum", "mean"])
def test_padded_gather_equals_patch_gather(reduce, dtype):
    cu = cu_from_lengths([3, 0, 1, 4, 2, 0, 6])
    (x,) = _leaves((int(cu[-1]), 24), dtype=dtype)  # continuous random values: no tied maxima
    expected = dk.patch_gather(x, cu, reduce=reduce, backend="torch")
    actual = padded_ops.patch_gather(x, cu, reduce=reduce)
    assert_close(actual, expected, dtype)
    assert_close(_grads(actual, (x,), 3)[0], _grads(expected, (x,), 3)[0], dtype)


@pytest.mark.parametrize("total_tokens", [None, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_scatter_equals_patch_scatter(dtype, total_tokens):
    cu = cu_from_lengths([3, 0, 1, 4, 2, 0, 6])
    (y,) = _leaves((7, 24), dtype=dtype)
    expected = dk.patch_scatter(y, cu, backend="torch")
    actual = padded_ops.patch_scatter(y, cu, total_tokens=total_tokens)
    assert_close(actual, expected, dtype)
    assert_close(_grads(actual, (y,), 4)[0], _grads(expected, (y,), 4)[0], dtype)


class _OpRecorder(TorchDispatchMode):
    """Records the name of every aten / custom op that runs."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


DK_OPS = {"dpar::varlen_attention", "dpar::patch_gather", "dpar::patch_scatter"}


def _loss_and_grads(model, tokens, labels, patches):
    recorder = _OpRecorder()
    with recorder:
        loss = model.loss(tokens, labels, patches)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, grads, recorder.names


def test_swapped_in_dpar_model_gives_the_same_loss_and_gradients():
    config, model, _, _ = tiny_models(torch.float64)
    tokens, labels, patches, _ = random_batch(config, images=3, max_len=4, seed=2)
    loss, grads, ops = _loss_and_grads(model, tokens, labels, patches)
    assert DK_OPS <= ops, "the model should call the dk ops by default"
    with padded_ops.swapped_in():
        padded_loss, padded_grads, padded_ops_seen = _loss_and_grads(model, tokens, labels, patches)
    assert not DK_OPS & padded_ops_seen, "inside swapped_in() the model must not reach the dk ops"
    assert any("scaled_dot_product" in name for name in padded_ops_seen), "the padded SDPA should run"
    assert_close(padded_loss, loss, torch.float64)
    for got, want in zip(padded_grads, grads):
        assert_close(got, want, torch.float64)
    assert dk.varlen_attention is not padded_ops.varlen_attention, "swapped_in() must restore the dk ops"


def test_swapped_in_restores_the_ops_after_an_error():
    originals = (dk.varlen_attention, dk.patch_gather, dk.patch_scatter)
    with pytest.raises(RuntimeError, match="boom"):
        with padded_ops.swapped_in():
            assert dk.patch_gather is padded_ops.patch_gather
            raise RuntimeError("boom")
    assert (dk.varlen_attention, dk.patch_gather, dk.patch_scatter) == originals
