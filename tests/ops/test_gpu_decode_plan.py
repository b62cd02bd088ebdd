"""The launch plan of the Triton decode and attention kernels on a GPU, checked without one: split counts from the
work against the SM count, launches per decode call, the short-sequence attention tiles. The decode results are
checked under the interpreter (TRITON_INTERPRET=1) against the float64 reference; nothing here is timed."""
import pytest
import torch
from helpers import triton_on_cpu
from test_kvcache import reference

import dpar_kernels as dk

H200_SMS = 132


def test_one_split_when_the_units_fill_the_gpu():
    assert dk_splits(units=32 * 16, key_tiles=64) == 1  # B 32 x Hk 16: 512 programs on 132 SMs
    assert dk_splits(units=106, key_tiles=64) == 1  # >= 80% of the SMs


def test_small_batches_split_the_keys_by_occupancy():
    """B 1 x Hk 8 (one row block) over 256 keys (4 tiles of 64) used to be one program per head: now every tile
    gets its own program; with a long cache the splits fill about a wave of SMs, not a fixed count."""
    assert dk_splits(units=8, key_tiles=4) == 4
    long_cache = dk_splits(units=8, key_tiles=64)
    assert 8 < long_cache <= 32 and 8 * long_cache <= 2 * H200_SMS
    assert dk_splits(units=1, key_tiles=1) == 1  # one tile: nothing to split


@pytest.mark.parametrize("units, key_tiles", [(1, 300), (3, 17), (40, 9), (100, 1000)])
def test_split_counts_stay_in_bounds(units, key_tiles):
    splits = dk_splits(units, key_tiles)
    assert 1 <= splits <= min(32, key_tiles)


def dk_splits(units, key_tiles):
    from dpar_kernels.kvcache.triton_kernels import num_splits

    return num_splits(units, key_tiles, H200_SMS)


@pytest.mark.skipif(not triton_on_cpu(), reason="needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("sms", [1, 64], ids=["one-split", "many-splits"])
@pytest.mark.parametrize("appended", [True, False])
def test_decode_launches_and_matches_the_reference(monkeypatch, sms, appended):
    """One launch (write + attention) with one split; attention + merge with several. The new keys are read from
    k/v and stored by the same launch: the caches and the output equal the reference's either way."""
    from dpar_kernels.kvcache import triton_kernels as kt

    monkeypatch.setattr(kt, "sm_count", lambda device: sms)
    launches = []
    for name in ("_attend_kernel", "_merge_kernel"):
        kernel = getattr(kt, name)
        monkeypatch.setattr(kt, name, _Counted(kernel, name, launches))
    torch.manual_seed(0)
    batch, seqlen_q, heads_q, heads_kv, d, max_keys = 2, 3, 4, 2, 16, 70
    q = torch.randn(batch, seqlen_q, heads_q, d)
    k_cache, v_cache = torch.randn(batch, max_keys, heads_kv, d), torch.randn(batch, max_keys, heads_kv, d)
    k, v = (torch.randn(batch, seqlen_q, heads_kv, d), torch.randn(batch, seqlen_q, heads_kv, d)) if appended \
        else (None, None)
    cache_seqlens = torch.tensor([20, 66], dtype=torch.int32)  # row 1: two of three new keys fit
    expected, expected_k, expected_v = reference(q, k_cache, v_cache, cache_seqlens, k, v, causal=True)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = dk.kvcache_attention(q, kc, vc, cache_seqlens, k, v, backend="triton")
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    assert torch.equal(kc.double(), expected_k) and torch.equal(vc.double(), expected_v)
    assert launches == (["_attend_kernel"] if sms == 1 else ["_attend_kernel", "_merge_kernel"])


class _Counted:
    """A Triton kernel whose launches are recorded by name."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
def test_short_ragged_sequences_take_the_short_tiles(dtype, d):
    """DPAR's sequences (patches, per-image token runs) are short: tiles of at most 64 rows, 4 warps (the forward
    64 query rows); long ones keep the big tiles; fp32 keeps its own table."""
    from dpar_kernels.attention.triton_kernels import SHORT_SEQLEN, gpu_tiles

    for kind in ("forward", "dkdv", "dq"):
        short = gpu_tiles(kind, dtype, d, SHORT_SEQLEN, SHORT_SEQLEN)
        long = gpu_tiles(kind, dtype, d, 4 * SHORT_SEQLEN, 4 * SHORT_SEQLEN)
        assert short.warps == 4 and long.warps == 8, kind
        assert max(short.m, short.n) <= 64 and short.m * short.n <= long.m * long.n, kind
        assert gpu_tiles(kind, dtype, d, 100, 2 * SHORT_SEQLEN).warps == 8, kind  # one long side: long tiles
    assert gpu_tiles("forward", dtype, d, SHORT_SEQLEN, SHORT_SEQLEN).m == 64
    assert gpu_tiles("forward", torch.float32, d, 16, 16).warps == gpu_tiles("forward", torch.float32, d, 4096,
                                                                             4096).warps
