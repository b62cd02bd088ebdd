"""dpar_kernels.flash_attn_compat: flash-attn 2.x / torch varlen_attn signatures, defaults, rejections, a model.

flash_attn_with_kvcache: its argument handling against a fake dk.kvcache_attention that records what the wrapper
hands on, and end to end on the real op against a dense float64 reference.
"""
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, cpu_backends
from test_kvcache import reference as kvcache_reference

import dpar_kernels as dk
from dpar_kernels import flash_attn_compat as fac

# flash-attn 2.x, flash_attn/flash_attn_interface.py (name, default); inspect.Parameter.empty = required
REQUIRED = inspect.Parameter.empty
FLASH_VARLEN = [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED), ("cu_seqlens_q", REQUIRED),
                ("cu_seqlens_k", REQUIRED), ("max_seqlen_q", REQUIRED), ("max_seqlen_k", REQUIRED),
                ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False),
                ("block_table", None)]
FLASH_KVCACHE = [("q", REQUIRED), ("k_cache", REQUIRED), ("v_cache", REQUIRED), ("k", None), ("v", None),
                 ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None), ("cache_batch_idx", None),
                 ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None), ("causal", False),
                 ("window_size", (-1, -1)), ("softcap", 0.0), ("rotary_interleaved", True),
                 ("alibi_slopes", None), ("num_splits", 0), ("return_softmax_lse", False)]


def _parameters(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("fn, expected", [(fac.flash_attn_varlen_func, FLASH_VARLEN),
                                          (fac.flash_attn_with_kvcache, FLASH_KVCACHE)])
def test_signature_is_flash_attn_2(fn, expected):
    assert _parameters(fn) == expected


def test_signature_is_torch_varlen_attn():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    theirs = inspect.signature(varlen.varlen_attn).parameters.values()
    assert _parameters(fac.varlen_attn) == [(p.name, p.default) for p in theirs]
    assert [p.kind for p in inspect.signature(fac.varlen_attn).parameters.values()] == [p.kind for p in theirs]


def _packed(lengths, heads=2, kv_heads=2, dim=32, dtype=torch.float64):
    cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, heads, dim, dtype=dtype)
    k, v = torch.randn(2, total, kv_heads, dim, dtype=dtype)
    return q, k, v, cu, max(lengths)


def _padded_reference(q, k, v, lengths, causal, scale=None):
    """Per-sequence SDPA (independent of dpar_kernels), GQA by repeating k/v heads."""
    outs, start = [], 0
    group = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


def test_positional_flash_attn_call_and_causal_default():
    q, k, v, cu, longest = _packed([5, 1, 7], heads=4, kv_heads=2)
    causal_out = fac.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, 0.0, None, True)
    assert_close(causal_out, _padded_reference(q, k, v, [5, 1, 7], causal=True), torch.float64)
    default_out = fac.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)  # flash-attn: causal=False
    assert_close(default_out, _padded_reference(q, k, v, [5, 1, 7], causal=False), torch.float64)
    scaled = fac.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=0.3, deterministic=True)
    assert_close(scaled, _padded_reference(q, k, v, [5, 1, 7], causal=False, scale=0.3), torch.float64)


@pytest.mark.parametrize("argument, value", [("dropout_p", 0.1), ("window_size", (8, 0)), ("softcap", 30.0),
                                             ("alibi_slopes", torch.ones(2)), ("return_attn_probs", True),
                                             ("block_table", torch.zeros(1, 1, dtype=torch.int32))])
def test_varlen_unsupported_features_name_the_argument(argument, value):
    q, k, v, cu, longest = _packed([3, 4])
    with pytest.raises(NotImplementedError, match=argument):
        fac.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, **{argument: value})


class FlashStyleAttention(torch.nn.Module):
    """A flash-attn user's block: fused qkv, unpad by attention_mask, varlen attention, pad back."""

    def __init__(self, width: int, heads: int, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = torch.nn.Linear(width, 3 * width, dtype=torch.float64)
        self.proj = torch.nn.Linear(width, width, dtype=torch.float64)

    def forward(self, hidden, attention_mask):
        batch, seqlen, width = hidden.shape
        indices = attention_mask.flatten().nonzero().flatten()  # flash_attn.bert_padding.unpad_input
        lengths = attention_mask.sum(1, dtype=torch.int32)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        qkv = self.qkv(hidden.reshape(-1, width)[indices]).view(-1, 3, self.heads, width // self.heads)
        out = self.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, int(lengths.max()), int(lengths.max()),
                             0.0, None, True)
        padded = hidden.new_zeros(batch * seqlen, width)  # pad_input
        padded[indices] = self.proj(out.reshape(-1, width))
        return padded.view(batch, seqlen, width)


def _sdpa_attention(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    return _padded_reference(q, k, v, lengths, causal, softmax_scale)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b in ("torch", "cpu")])
def test_flash_style_model_matches_sdpa_with_gradients(backend, default_backend):
    default_backend(backend)
    model = FlashStyleAttention(width=64, heads=2, attention=fac.flash_attn_varlen_func)
    reference = FlashStyleAttention(width=64, heads=2, attention=_sdpa_attention)
    reference.load_state_dict(model.state_dict())
    hidden = torch.randn(3, 9, 64, dtype=torch.float64)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for row, n in enumerate([9, 1, 6]):  # a full row, a single token, a padded row
        mask[row, :n] = True
    out = model(hidden, mask)
    expected = reference(hidden, mask)
    assert_close(out, expected, torch.float64)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float64)


def test_torch_varlen_attn_window_gqa_and_lse():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    q, k, v, cu, longest = _packed([4, 6], heads=4, kv_heads=2)
    out = fac.varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=True)
    assert_close(out, _padded_reference(q, k, v, [4, 6], causal=True), torch.float64)
    full, lse = fac.varlen_attn(q, k, v, cu, cu, longest, longest, enable_gqa=True,
                                return_aux=varlen.AuxRequest(lse=True), scale=0.5)
    assert_close(full, _padded_reference(q, k, v, [4, 6], causal=False, scale=0.5), torch.float64)
    scores = torch.einsum("qhd,khd->hqk", q[:4], k[:4].repeat_interleave(2, 1)) * 0.5
    assert lse.shape == (q.shape[0], q.shape[1])
    assert_close(lse[:4], torch.logsumexp(scores, -1).transpose(0, 1), torch.float64)
    with pytest.raises(ValueError, match="enable_gqa"):
        fac.varlen_attn(q, k, v, cu, cu, longest, longest)
    with pytest.raises(NotImplementedError, match="window_size"):
        fac.varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(3, 0), enable_gqa=True)


class FakeKVCache:
    """Stands in for dk.kvcache_attention: records its arguments, returns a recognisable tensor."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, softmax_scale=None, causal=True,
                 backend=None):
        self.calls.append(dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v,
                               softmax_scale=softmax_scale, causal=causal))
        return torch.full_like(q, 7.0)


@pytest.fixture
def fake_kvcache(monkeypatch):
    fake = FakeKVCache()
    monkeypatch.setattr(dk, "kvcache_attention", fake, raising=False)
    return fake


def _cache(batch=2, s_max=16, sq=3, heads=4, kv_heads=2, dim=32):
    q = torch.randn(batch, sq, heads, dim)
    k_cache, v_cache = torch.randn(2, batch, s_max, kv_heads, dim)
    k, v = torch.randn(2, batch, sq, kv_heads, dim)
    return q, k_cache, v_cache, k, v


def test_kvcache_passes_arguments_and_int_seqlens(fake_kvcache):
    q, k_cache, v_cache, k, v = _cache()
    out = fac.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=5, softmax_scale=0.25)
    call = fake_kvcache.calls[-1]
    assert torch.equal(out, torch.full_like(q, 7.0))
    assert call["q"] is q and call["k"] is k and call["v"] is v and call["k_cache"] is k_cache
    assert call["causal"] is False and call["softmax_scale"] == 0.25  # flash-attn's default causal=False
    assert call["cache_seqlens"].dtype == torch.int32 and call["cache_seqlens"].tolist() == [5, 5]
    seqlens = torch.tensor([2, 9], dtype=torch.int32)
    fac.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
    assert fake_kvcache.calls[-1]["cache_seqlens"] is seqlens and fake_kvcache.calls[-1]["causal"] is True
    assert fake_kvcache.calls[-1]["k"] is None
    fac.flash_attn_with_kvcache(q, k_cache, v_cache)  # no cache_seqlens, no new keys: the whole cache
    assert fake_kvcache.calls[-1]["cache_seqlens"].tolist() == [16, 16]
    fac.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.int64(3))
    assert fake_kvcache.calls[-1]["cache_seqlens"].tolist() == [3, 3]


def _complex_rotary(x, cos, sin, positions, rotary_dim, interleaved):
    """Independent rotary reference: multiply channel pairs by e^{i theta} as complex numbers."""
    rot = x[..., :rotary_dim].double()
    if interleaved:
        pairs = torch.view_as_complex(rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2).contiguous())
    else:
        pairs = torch.complex(rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:])
    phase = torch.complex(cos.double()[positions], sin.double()[positions]).unsqueeze(2)
    turned = pairs * phase
    if interleaved:
        turned = torch.view_as_real(turned).flatten(-2)
    else:
        turned = torch.cat((turned.real, turned.imag), -1)
    return torch.cat((turned.to(x.dtype), x[..., rotary_dim:]), -1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary_positions(fake_kvcache, interleaved, causal):
    q, k_cache, v_cache, k, v = _cache(sq=3, dim=32)
    rotary_dim, seqlen_ro = 16, 20
    angles = torch.arange(seqlen_ro)[:, None] * (10000 ** (-torch.arange(rotary_dim // 2) / (rotary_dim // 2)))
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([0, 11], dtype=torch.int32)
    fac.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, seqlens, causal=causal,
                                rotary_interleaved=interleaved)
    call = fake_kvcache.calls[-1]
    steps = seqlens.long()[:, None] + torch.arange(3)[None]
    q_steps = steps if causal else seqlens.long()[:, None].expand(2, 3)
    assert_close(call["k"], _complex_rotary(k, cos, sin, steps, rotary_dim, interleaved), torch.float32)
    assert_close(call["q"], _complex_rotary(q, cos, sin, q_steps, rotary_dim, interleaved), torch.float32)
    assert call["v"] is v


@pytest.mark.parametrize("argument, value", [("cache_batch_idx", torch.zeros(2, dtype=torch.int32)),
                                             ("cache_leftpad", torch.zeros(2, dtype=torch.int32)),
                                             ("block_table", torch.zeros(2, 1, dtype=torch.int32)),
                                             ("alibi_slopes", torch.ones(4)), ("window_size", (4, 0)),
                                             ("softcap", 5.0), ("return_softmax_lse", True)])
def test_kvcache_unsupported_features_name_the_argument(fake_kvcache, argument, value):
    q, k_cache, v_cache, k, v = _cache()
    with pytest.raises(NotImplementedError, match=argument):
        fac.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=1, **{argument: value})
    assert not fake_kvcache.calls


def test_kvcache_argument_errors(fake_kvcache):
    q, k_cache, v_cache, k, v = _cache()
    with pytest.raises(ValueError, match="cache_seqlens"):
        fac.flash_attn_with_kvcache(q, k_cache, v_cache, k, v)
    with pytest.raises(ValueError, match="k and v"):
        fac.flash_attn_with_kvcache(q, k_cache, v_cache, k, None, cache_seqlens=1)
    with pytest.raises(ValueError, match="rotary"):
        fac.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=torch.ones(4, 8), rotary_sin=torch.ones(4, 8),
                                    cache_seqlens=1)
    with pytest.raises(TypeError, match="cache_seqlens"):
        fac.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1.5)
    assert not fake_kvcache.calls


def test_cu_seqlens_from_position_ids_hf_packing():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])
    cu, longest = dk.cu_seqlens_from_position_ids(position_ids, return_max_seqlen=True)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 10] and longest == 4
    assert dk.cu_seqlens_from_position_ids(torch.tensor([[0, 1], [0, 1]])).tolist() == [0, 2, 4]  # rows split
    assert dk.cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)).tolist() == [0]
    for bad in ([1, 2, 3], [0, 1, 3], [0, 2]):
        with pytest.raises(ValueError, match="position_ids"):
            dk.cu_seqlens_from_position_ids(torch.tensor(bad))
    with pytest.raises(TypeError, match="position_ids"):
        dk.cu_seqlens_from_position_ids(torch.zeros(3))


def test_packed_batch_from_position_ids_matches_per_sequence_attention():
    position_ids = torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2])
    cu, longest = dk.cu_seqlens_from_position_ids(position_ids, return_max_seqlen=True)
    q, k, v, _, _ = _packed([4, 2, 3])
    out = fac.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
    assert_close(out, _padded_reference(q, k, v, [4, 2, 3], causal=True), torch.float64)


def test_available_backends_accepts_strings():
    assert dk.available_backends("cpu") == dk.available_backends(torch.device("cpu"))
    assert "torch" in dk.available_backends("cpu")



@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_end_to_end_on_the_real_op(backend, causal, default_backend):
    default_backend(backend)
    q, k_cache, v_cache, k, v = _cache()
    seqlens = torch.tensor([0, 9], dtype=torch.int32)
    expected, expected_k, expected_v = kvcache_reference(q, k_cache, v_cache, seqlens, k, v, causal)
    out = fac.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal)
    assert_close(out, expected, torch.float32)
    assert_close(k_cache, expected_k, torch.float32)  # written in place, as flash-attn does
    assert_close(v_cache, expected_v, torch.float32)
    assert seqlens.tolist() == [0, 9]  # and cache_seqlens itself is not advanced
