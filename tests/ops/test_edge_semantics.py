"""One NaN/inf semantics per op, followed by every backend runnable here (torch, cpu, triton under the
interpreter), and the argument checks of the ops: the exception type names the mistake."""
import math

import numpy as np
import pytest
import torch
from helpers import cpu_backends

import dpar_kernels as dk

BACKENDS = cpu_backends()
NAN = float("nan")


def _cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def _attention(q, k, v, cu, backend, **kwargs):
    n = q.shape[0]
    return dk.varlen_attention(q, k, v, cu, cu, n, n, return_lse=True, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_query_row_is_nan_with_lse_minus_inf_others_untouched(backend):
    q, k, v = (torch.randn(6, 2, 32) for _ in range(3))
    cu = _cu(0, 6)
    clean_out, clean_lse = _attention(q, k, v, cu, "torch")
    q[2, 0] = NAN
    out, lse = _attention(q, k, v, cu, backend)
    assert torch.isnan(out[2, 0]).all() and torch.isneginf(lse[0, 2])
    keep = torch.ones(6, 2, dtype=torch.bool)
    keep[2, 0] = False
    assert not torch.isnan(out[keep]).any()
    torch.testing.assert_close(out[keep], clean_out[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_key_reaches_only_the_queries_that_see_it(backend):
    q, k, v = (torch.randn(6, 2, 32) for _ in range(3))
    k[3, :, 5] = NAN  # causal: queries 3, 4, 5 see key 3; queries 0-2 do not
    out, lse = _attention(q, k, v, _cu(0, 6), backend)
    assert torch.isnan(out[3:]).all(dim=-1).all() and torch.isneginf(lse[:, 3:]).all()
    assert torch.isfinite(out[:3]).all() and torch.isfinite(lse[:, :3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_value_poisons_its_sequence_only(backend):
    q, k, v = (torch.randn(8, 2, 32) for _ in range(3))
    v[5, 0, 0] = NAN  # key 5 of the second sequence [4, 8)
    out, lse = _attention(q, k, v, _cu(0, 4, 8), backend)
    assert torch.isnan(out[5:, 0, 0]).all()  # the queries that see it
    assert torch.isfinite(out[:4]).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("scale", [NAN, math.inf, -math.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rejects_non_finite_softmax_scale(backend, scale):
    q = torch.randn(4, 2, 32)
    with pytest.raises(ValueError, match="softmax_scale"):
        _attention(q, q, q, _cu(0, 4), backend, softmax_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_max_seqlen_takes_any_integer_kind(backend):
    q = torch.randn(4, 2, 32)
    expected = dk.varlen_attention(q, q, q, _cu(0, 4), _cu(0, 4), 4, 4, backend=backend)
    for value in (np.int64(4), np.int32(5), torch.tensor(4), torch.tensor(6, dtype=torch.int32)):
        out = dk.varlen_attention(q, q, q, _cu(0, 4), _cu(0, 4), value, value, backend=backend)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("value, error", [(2**70, ValueError), (-1, ValueError), (4.0, TypeError), (True, TypeError),
                                          (torch.tensor([4]), TypeError), (torch.tensor(4.0), TypeError)])
def test_attention_max_seqlen_bad_values(value, error):
    q = torch.randn(4, 2, 32)
    with pytest.raises(error, match="max_seqlen_q"):
        dk.varlen_attention(q, q, q, _cu(0, 4), _cu(0, 4), value, 4)


def test_attention_argument_types():
    q = torch.randn(4, 2, 32)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        dk.varlen_attention(q, q, q, [0, 4], _cu(0, 4), 4, 4)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        dk.varlen_attention(q, q, q, _cu(0, 4), [0, 4], 4, 4)
    empty = torch.randn(4, 2, 0)
    with pytest.raises(ValueError, match="head dim"):
        dk.varlen_attention(empty, empty, empty, _cu(0, 4), _cu(0, 4), 4, 4)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_fp16_accumulates_in_fp32(backend, reduce):
    x = torch.full((10, 4), 60000.0, dtype=torch.float16)
    out = dk.patch_gather(x, _cu(0, 10), reduce=reduce, backend=backend)
    expected = {"sum": math.inf, "mean": 60000.0, "max": 60000.0}[reduce]  # a sum of 600000 overflows fp16
    assert torch.equal(out, torch.full((1, 4), expected, dtype=torch.float16))
    # cancellation: 60000 + 60000 - 60000 ... would be inf in fp16 arithmetic, exact in fp32
    y = torch.tensor([[60000.0], [60000.0], [-60000.0], [-60000.0], [8.0]], dtype=torch.float16)
    assert float(dk.patch_gather(y, _cu(0, 5), reduce="sum", backend=backend)) == 8.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_nan_and_inf_propagate_per_patch_column(backend):
    x = torch.randn(6, 3)
    x[1, 0], x[4, 1], x[3, 2], x[5, 2] = NAN, NAN, math.inf, -math.inf
    cu = _cu(0, 3, 6)
    for reduce in ("max", "sum", "mean"):
        out = dk.patch_gather(x, cu, reduce=reduce, backend=backend)
        assert torch.isnan(out[0, 0]) and torch.isnan(out[1, 1]), reduce
        assert torch.isfinite(out[0, 1:]).all() and torch.isfinite(out[1, 0]), reduce
        assert (out[1, 2] == math.inf) if reduce == "max" else torch.isnan(out[1, 2]), reduce
    leaf = x.clone().requires_grad_()
    dk.patch_gather(leaf, cu, reduce="max", backend=backend).sum().backward()
    assert leaf.grad[:, 0][:3].sum() == 0 and leaf.grad[:, 1][3:].sum() == 0  # a NaN column passes no gradient


def test_patch_scatter_argument_types():
    y = torch.randn(1, 3)
    with pytest.raises(TypeError, match="cu_tokens"):
        dk.patch_scatter(y, [0, 4])
    with pytest.raises(TypeError, match="total_tokens"):
        dk.patch_scatter(y, _cu(0, 4), total_tokens=4.0)
    assert dk.patch_scatter(y, _cu(0, 4), total_tokens=np.int64(4)).shape == (4, 3)
    with pytest.raises(TypeError, match="cu_tokens"):
        dk.patch_gather(torch.randn(4, 3), [0, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_temperature_limits(backend, dtype):
    logits = torch.randn(3, 16) * 5
    logits[1, 3] = logits[1, 5] = logits[1, 7] = logits[1].max() + 1  # three maximal logits
    logits = logits.to(dtype)
    for huge in (1e20, 1e30, 1e300):
        torch.testing.assert_close(dk.token_entropy(logits, temperature=huge, backend=backend),
                                   torch.full((3,), math.log(16)), rtol=1e-6, atol=1e-6)
    for tiny in (1e-20, 1e-30, 1e-300, 5e-324):
        torch.testing.assert_close(dk.token_entropy(logits, temperature=tiny, backend=backend).abs(),
                                   torch.tensor([0.0, math.log(3), 0.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_entropy_temperature_limits(backend):
    hidden, weight = torch.randn(3, 8), torch.randn(16, 8)
    torch.testing.assert_close(dk.linear_entropy(hidden, weight, temperature=1e300, backend=backend),
                               torch.full((3,), math.log(16)))
    torch.testing.assert_close(dk.linear_entropy(hidden, weight, temperature=1e-300, backend=backend).abs(),
                               torch.zeros(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_nan_row_and_masked_rows(backend):
    logits = torch.randn(3, 16)
    logits[0] = -math.inf
    logits[1, 4] = NAN
    logits[2, :8] = -math.inf
    out = dk.token_entropy(logits, backend=backend)
    assert torch.isnan(out[:2]).all()
    torch.testing.assert_close(out[2], dk.token_entropy(logits[2:, 8:], backend="torch")[0])


@pytest.mark.parametrize("temperature", [NAN, math.inf, 0.0, -1.0])
def test_entropy_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        dk.token_entropy(torch.randn(2, 8), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        dk.linear_entropy(torch.randn(2, 8), torch.randn(5, 8), temperature=temperature)


def test_lengths_to_cu_seqlens_refuses_int32_overflow():
    with pytest.raises(ValueError, match="int32"):
        dk.lengths_to_cu_seqlens(torch.tensor([2**31 - 1, 10]))
    assert dk.lengths_to_cu_seqlens(torch.tensor([2**31 - 2, 1])).tolist() == [0, 2**31 - 2, 2**31 - 1]
    with pytest.raises(ValueError, match="non-negative"):
        dk.lengths_to_cu_seqlens(torch.tensor([3, -1]))


@pytest.mark.parametrize("fields", [dict(num_kv_heads=0), dict(num_heads=0), dict(width=2, num_heads=4,
                                                                                  num_kv_heads=4)])
@pytest.mark.parametrize("name", ["tiny", "entropy-tiny"])
def test_config_rejects_zero_heads_and_head_dim(name, fields):
    from dpar.model.config import get_config
    with pytest.raises(ValueError, match="num_heads|num_kv_heads"):
        get_config(name, **fields)


@pytest.mark.parametrize("knobs, name", [(dict(temperature=NAN), "temperature"), (dict(cfg_scale=NAN), "cfg_scale"),
                                         (dict(cfg_scale=math.inf), "cfg_scale"), (dict(temperature=-1.0),
                                                                                   "temperature"),
                                         (dict(threshold=NAN), "threshold"),
                                         (dict(threshold=torch.tensor([0.5, NAN])), "threshold")])
def test_generate_rejects_nan_sampling_knobs(knobs, name):
    from model_utils import tiny_models
    _, dpar_model, baseline, entropy_model = tiny_models(torch.float32)
    threshold = knobs.pop("threshold", 1.0)
    with pytest.raises(ValueError, match=name):
        dpar_model.generate([0, 1], entropy_model=entropy_model, threshold=threshold, max_patch_size=2, **knobs)
    if name != "threshold":
        with pytest.raises(ValueError, match=name):
            baseline.generate([0, 1], **knobs)
