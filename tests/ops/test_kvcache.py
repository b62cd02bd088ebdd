"""dk.kvcache_attention against a float64 dense reference, on every backend runnable here.

The reference (reference() below) is written independently of dpar_kernels/kvcache/naive.py: a per-row, per-query
loop over the keys each query may see.
"""
import math

import pytest
import torch
from helpers import assert_close, cpu_backends, requires_extension

import dpar_kernels as dk

BACKENDS = cpu_backends()
DTYPES = [torch.float32, torch.float16]


def reference(q, k_cache, v_cache, cache_seqlens, k=None, v=None, causal=True):
    """float64 loop: returns (out, k_cache after the writes, v_cache after the writes)."""
    q, k_cache, v_cache = q.double(), k_cache.double().clone(), v_cache.double().clone()
    batch, seqlen_q, heads_q, d = q.shape
    max_keys, heads_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        cached = min(max(int(cache_seqlens[b]), 0), max_keys)
        if k is not None:
            for i in range(seqlen_q):
                if cached + i < max_keys:
                    k_cache[b, cached + i], v_cache[b, cached + i] = k[b, i].double(), v[b, i].double()
        total = cached + (seqlen_q if k is not None else 0)
        for i in range(seqlen_q):
            end = min(max(total - seqlen_q + i + 1 if causal else total, 0), max_keys)
            if end == 0:
                continue
            for h in range(heads_q):
                kv = h // (heads_q // heads_kv)
                scores = k_cache[b, :end, kv] @ q[b, i, h] / math.sqrt(d)
                out[b, i, h] = torch.softmax(scores, 0) @ v_cache[b, :end, kv]
    return out, k_cache, v_cache


def _inputs(batch, seqlen_q, heads_q, heads_kv, d, max_keys, dtype, with_new=True):
    q = torch.randn(batch, seqlen_q, heads_q, d, dtype=dtype)
    k_cache = torch.randn(batch, max_keys, heads_kv, d, dtype=dtype)
    v_cache = torch.randn(batch, max_keys, heads_kv, d, dtype=dtype)
    k = torch.randn(batch, seqlen_q, heads_kv, d, dtype=dtype) if with_new else None
    v = torch.randn(batch, seqlen_q, heads_kv, d, dtype=dtype) if with_new else None
    return q, k_cache, v_cache, k, v


def _run(backend, q, k_cache, v_cache, cache_seqlens, k, v, causal=True):
    """Runs the op on copies of the caches -> (out, k_cache, v_cache) after the call."""
    kc, vc = k_cache.clone(), v_cache.clone()
    out = dk.kvcache_attention(q, kc, vc, cache_seqlens, k, v, causal=causal, backend=backend)
    return out, kc, vc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen_q", [1, 2, 5])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa2", "mqa6"])
def test_matches_reference_with_new_keys(backend, dtype, seqlen_q, heads):
    q, k_cache, v_cache, k, v = _inputs(4, seqlen_q, *heads, 16, 150, dtype)
    cache_seqlens = torch.tensor([0, 7, 140, 150 - seqlen_q], dtype=torch.int32)  # empty, short, long, full
    out, kc, vc = _run(backend, q, k_cache, v_cache, cache_seqlens, k, v)
    expected, ekc, evc = reference(q, k_cache, v_cache, cache_seqlens, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype)
    assert torch.equal(kc.double(), ekc) and torch.equal(vc.double(), evc), "in-place cache writes differ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_matches_reference_without_new_keys(backend, causal, seqlen_q):
    q, k_cache, v_cache, _, _ = _inputs(3, seqlen_q, 4, 2, 32, 70, torch.float32, with_new=False)
    cache_seqlens = torch.tensor([0, 2, 70], dtype=torch.int32)  # row 0 empty: its queries see no key -> 0
    out, kc, vc = _run(backend, q, k_cache, v_cache, cache_seqlens, None, None, causal)
    expected, _, _ = reference(q, k_cache, v_cache, cache_seqlens, causal=causal)
    assert_close(out, expected, torch.float32)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache), "without k/v the caches must not change"


# the triton kernels take fp32/fp16/bf16 only (float64 is rejected: test_rejects_bad_inputs)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_float64_matches_reference(backend):
    q, k_cache, v_cache, k, v = _inputs(2, 2, 4, 2, 24, 90, torch.float64)
    cache_seqlens = torch.tensor([33, 88], dtype=torch.int32)
    out, kc, _ = _run(backend, q, k_cache, v_cache, cache_seqlens, k, v)
    expected, ekc, _ = reference(q, k_cache, v_cache, cache_seqlens, k, v)
    assert_close(out, expected, torch.float64)
    assert torch.equal(kc, ekc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_cache_seqlens_clamp_and_never_write_out_of_bounds(backend):
    seqlen_q, max_keys = 5, 40
    q, k_cache, v_cache, k, v = _inputs(4, seqlen_q, 2, 1, 16, max_keys, torch.float32)
    # 38: two of five new keys fit; 40: none fit; 10**6: clamped to 40; -3: clamped to 0
    cache_seqlens = torch.tensor([38, 40, 10**6, -3], dtype=torch.int32)
    storage_k = torch.full((6, max_keys, 1, 16), float("nan"))  # guard rows around the cache
    storage_v = torch.full((6, max_keys, 1, 16), float("nan"))
    storage_k[1:5], storage_v[1:5] = k_cache, v_cache
    kc, vc = storage_k[1:5], storage_v[1:5]
    out = dk.kvcache_attention(q, kc, vc, cache_seqlens, k, v, backend=backend)
    expected, ekc, evc = reference(q, k_cache, v_cache, cache_seqlens, k, v)
    assert_close(out, expected, torch.float32)
    assert torch.equal(kc, ekc.float()) and torch.equal(vc, evc.float())
    for guard in (storage_k[0], storage_k[5], storage_v[0], storage_v[5]):
        assert torch.isnan(guard).all(), "a write landed outside the cache"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_caches_and_poisoned_output_rows(backend):
    """Caches that are slices of a bigger buffer (layer-major KV cache) and a non-contiguous q."""
    buffer_k = torch.randn(3, 2, 64, 2, 16)
    buffer_v = torch.randn(3, 2, 64, 2, 16)
    kc, vc = buffer_k[1], buffer_v[1]
    q = torch.randn(2, 4, 2, 16).transpose(1, 2)[:, :1]  # [2, 1, 4, 16] with odd strides
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    cache_seqlens = torch.tensor([10, 63], dtype=torch.int32)
    expected, ekc, _ = reference(q, kc, vc, cache_seqlens, k, v)
    before = buffer_k.clone()
    out = dk.kvcache_attention(q, kc, vc, cache_seqlens, k, v, backend=backend)
    assert_close(out, expected, torch.float32)
    assert torch.equal(kc, ekc.float())
    assert torch.equal(buffer_k[0], before[0]) and torch.equal(buffer_k[2], before[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_cache_splits_and_merges(backend):
    """A cache long enough for several KV splits (triton/cuda) with rows ending inside different splits."""
    q, k_cache, v_cache, k, v = _inputs(3, 1, 4, 2, 16, 700, torch.float32)
    cache_seqlens = torch.tensor([699, 300, 65], dtype=torch.int32)
    out, _, _ = _run(backend, q, k_cache, v_cache, cache_seqlens, k, v)
    expected, _, _ = reference(q, k_cache, v_cache, cache_seqlens, k, v)
    assert_close(out, expected, torch.float32)


def test_decoding_token_by_token_equals_varlen_attention():
    """Appending one token at a time reproduces causal varlen attention over the whole sequence."""
    length, heads_q, heads_kv, d = 9, 4, 2, 16
    q, k, v = torch.randn(length, heads_q, d), torch.randn(length, heads_kv, d), torch.randn(length, heads_kv, d)
    kc, vc = torch.zeros(1, length, heads_kv, d), torch.zeros(1, length, heads_kv, d)
    steps = [dk.kvcache_attention(q[t][None, None], kc, vc, torch.tensor([t], dtype=torch.int32),
                                  k[t][None, None], v[t][None, None])[0, 0] for t in range(length)]
    cu = torch.tensor([0, length], dtype=torch.int32)
    expected = dk.varlen_attention(q, k, v, cu, cu, length, length, backend="torch")
    assert_close(torch.stack(steps), expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    q, k_cache, v_cache, k, v = _inputs(2, 1, 4, 2, 16, 32, torch.float32)
    cache_seqlens = torch.tensor([3, 20], dtype=torch.int32)
    kc_eager, vc_eager = k_cache.clone(), v_cache.clone()
    eager = dk.kvcache_attention(q, kc_eager, vc_eager, cache_seqlens, k, v, backend=backend)

    def step(q, kc, vc, lengths, k, v):
        return dk.kvcache_attention(q * 1.0, kc, vc, lengths, k, v, backend=backend) + 0.0

    kc, vc = k_cache.clone(), v_cache.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, cache_seqlens, k, v)
    assert torch.equal(compiled, eager)
    assert torch.equal(kc, kc_eager) and torch.equal(vc, vc_eager), "the mutation of the caches was lost"


def test_rejects_bad_inputs():
    q, kc, vc, k, v = _inputs(2, 1, 4, 2, 16, 8, torch.float32)
    lengths = torch.tensor([1, 2], dtype=torch.int32)
    call = dk.kvcache_attention
    with pytest.raises(TypeError, match="cache_seqlens"):
        call(q, kc, vc, lengths.long(), k, v)
    with pytest.raises(ValueError, match="cache_seqlens"):
        call(q, kc, vc, lengths[:1], k, v)
    with pytest.raises(TypeError, match="k_cache"):
        call(q, kc.double(), vc, lengths, k, v)
    with pytest.raises(TypeError, match="q"):
        call(q.long(), kc, vc, lengths, k, v)
    with pytest.raises(ValueError, match="q"):
        call(q[0], kc, vc, lengths, k, v)
    with pytest.raises(ValueError, match="k_cache"):
        call(q, kc[:, :, :, :8], vc[:, :, :, :8], lengths, k, v)
    with pytest.raises(ValueError, match="heads"):
        call(torch.randn(2, 1, 3, 16), kc, vc, lengths)
    with pytest.raises(ValueError, match="k must be"):
        call(q, kc, vc, lengths, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="together"):
        call(q, kc, vc, lengths, k, None)
    with pytest.raises(ValueError, match="k_cache must have a contiguous last dim"):
        call(q, kc.transpose(1, 3).contiguous().transpose(1, 3), vc, lengths)
    with pytest.raises(TypeError, match="float64"):
        call(q.double(), kc.double(), vc.double(), lengths, backend="triton")
    with pytest.raises(ValueError, match="requires grad"):
        call(q.requires_grad_(), kc, vc, lengths)
    with pytest.raises(ValueError, match="cache_seqlens is on meta"):
        call(q.detach(), kc, vc, lengths.to("meta"))


# The C++ kernel specialises its code per group of up to 8 SIMD vectors of a row (16 floats / 8 doubles each),
# reads float32 rows of a multiple of 16 in place and pads the others, and scores keys 16 (8) at a time with a
# zero-padded copy of the last partial block: head dims below, at and across those sizes, key counts around them.
@requires_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 8, 16, 24, 64, 80, 160, 272])
def test_cpu_head_dims_and_partial_key_blocks(dtype, d):
    q, k_cache, v_cache, k, v = _inputs(5, 2, 4, 2, d, 37, dtype)
    cache_seqlens = torch.tensor([0, 1, 14, 17, 35], dtype=torch.int32)  # ends 1..2, 2..3, 15..16, 18..19, 36..37
    for b, cached in enumerate(cache_seqlens.tolist()):  # hidden positions hold NaN: they must never be read
        k_cache[b, cached + 2:], v_cache[b, cached + 2:] = float("nan"), float("nan")
    out, kc, _ = _run("cpu", q, k_cache, v_cache, cache_seqlens, k, v)
    expected, ekc, _ = reference(q, k_cache, v_cache, cache_seqlens, k, v)
    assert_close(out, expected, dtype)
    assert torch.equal(kc.double().nan_to_num(), ekc.nan_to_num())


@requires_extension
def test_cpu_bfloat16_padded_rows():
    q, k_cache, v_cache, k, v = _inputs(2, 1, 2, 1, 80, 21, torch.bfloat16)
    cache_seqlens = torch.tensor([20, 3], dtype=torch.int32)
    out, _, _ = _run("cpu", q, k_cache, v_cache, cache_seqlens, k, v)
    assert_close(out, reference(q, k_cache, v_cache, cache_seqlens, k, v)[0], torch.bfloat16)


@requires_extension
def test_cpu_non_finite_keys_follow_the_reference():
    """A NaN value entry poisons only its column, a -inf score weighs 0, a +inf score makes its query NaN, and a
    NaN key seen by query 1 only (it is scored in the same key block as query 0's keys) leaves query 0 finite."""
    q, k_cache, v_cache, k, v = _inputs(4, 2, 2, 1, 16, 20, torch.float32)
    q[..., 0] = q[..., 0].abs() + 0.5
    v_cache[0, 3, 0, 5] = float("nan")
    k_cache[1, 7, 0, 0] = float("-inf")
    k_cache[2, 2, 0, 0] = float("inf")
    k[3, 1], v[3, 1] = float("nan"), float("nan")
    cache_seqlens = torch.tensor([18, 18, 18, 9], dtype=torch.int32)
    out, _, _ = _run("cpu", q, k_cache, v_cache, cache_seqlens, k, v)
    expected, _, _ = reference(q, k_cache, v_cache, cache_seqlens, k, v)
    assert torch.isnan(out[0, ..., 5]).all() and torch.isfinite(out[0, ..., :5]).all()
    assert torch.isfinite(out[1]).all() and torch.isnan(out[2]).all()
    assert torch.isfinite(out[3, 0]).all() and torch.isnan(out[3, 1]).all()
    assert_close(out, expected, torch.float32)


@requires_extension
def test_cpu_zero_head_dim_returns_an_empty_output():
    q, k_cache, v_cache, k, v = _inputs(2, 1, 2, 1, 0, 5, torch.float32)
    for scale in (1.0, None):  # the default scale 1/sqrt(d) must not divide by zero
        out = dk.kvcache_attention(q, k_cache, v_cache, torch.tensor([3, 5], dtype=torch.int32), k, v,
                                   softmax_scale=scale, backend="cpu")
        assert out.shape == (2, 1, 2, 0)
