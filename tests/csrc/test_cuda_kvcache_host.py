"""The CUDA KV-cache attention kernels (csrc/cuda/kvcache_kernels.cuh) run on the host against naive.py (no GPU).

tests/csrc/cuda_host/kvcache_emulation.cpp runs every thread of a block as a fiber (block_emulation.h), so the
kernels' own code is what is checked here: the fused cache write, the 16-byte (cp.async) and scalar tile copies,
scores with keys across lanes for all the GQA heads of a kv head, the online softmax, the P V product, the split
plan and the log-sum-exp merge. The kernels compute in fp32 (fp32/fp16/bf16 storage); the reference runs in float64
on the same rounded inputs.
"""
import ctypes
import math
import os

import pytest
import torch
from helpers import ROOT, assert_close
from test_cuda_attention_host import build_emulation

from dpar_kernels.kvcache import naive

EMULATION = os.path.join(ROOT, "tests", "csrc", "cuda_host", "kvcache_emulation.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # dpar::DType
NAN = float("nan")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernels as a ctypes library (the kernels' 16-byte loads pun types)."""
    return build_emulation(tmp_path_factory, EMULATION, ("-std=c++17", "-fno-strict-aliasing"))


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _sizes(q, k_cache):
    batch, seqlen_q, heads_q, head_dim = q.shape
    return (ctypes.c_int * 6)(batch, seqlen_q, heads_q, k_cache.shape[2], head_dim, k_cache.shape[1])


def _strides(*tensors):
    values = [s for t in tensors for s in (t.stride()[:3] if t is not None else (0, 0, 0))]
    return (ctypes.c_int64 * len(values))(*values)


def plan(lib, q, k_cache, slots):
    """(splits, keys per split) the launcher picks when `slots` CTAs run at once."""
    result = (ctypes.c_int * 2)()
    lib.dpar_emulated_kvcache_plan(DTYPE_CODES[q.dtype], _sizes(q, k_cache), ctypes.c_int64(slots), result)
    return result[0], result[1]


def vectorized(lib, q, k_cache, v_cache, k, v):
    return bool(lib.dpar_emulated_kvcache_vectorized(DTYPE_CODES[q.dtype], _sizes(q, k_cache), _ptr(k_cache),
                                                     _ptr(v_cache), _ptr(k), _ptr(v),
                                                     _strides(q, k_cache, v_cache, k, v, q)))


def emulated_kvcache(lib, q, k_cache, v_cache, cache_seqlens, k, v, scale, causal, slots):
    """-> (out, splits): the CUDA kernels run on the host with the plan for `slots`; out and workspaces start NaN."""
    splits, split_keys = plan(lib, q, k_cache, slots)
    assert splits >= 1
    out = torch.full(q.shape, NAN, dtype=q.dtype)
    rows = q.shape[0] * q.shape[1] * q.shape[2]
    part_out = torch.full((splits, rows, q.shape[3]), NAN) if splits > 1 else None
    part_lse = torch.full((splits, rows), NAN) if splits > 1 else None
    rc = lib.dpar_emulated_kvcache_forward(DTYPE_CODES[q.dtype], _sizes(q, k_cache), ctypes.c_float(scale),
                                           int(causal), (ctypes.c_int * 2)(splits, split_keys), _ptr(q),
                                           _ptr(k_cache), _ptr(v_cache), _ptr(cache_seqlens), _ptr(k), _ptr(v),
                                           _ptr(out), _ptr(part_out), _ptr(part_lse),
                                           _strides(q, k_cache, v_cache, k, v, out))
    assert rc == 0, f"launcher returned cudaError {rc}"
    return out, splits


def _inputs(batch, seqlen_q, heads_q, heads_kv, head_dim, max_keys, dtype, appended, layout):
    """q, k_cache, v_cache, k, v. layout: "dense"; "fused" (caches are the two halves of one [B, S, 2 Hk, d]
    tensor, q a head slice: strided, rows still 16-byte aligned); "offset" (every tensor one element past an
    aligned start: rows misaligned, the scalar copy path)."""
    def make(*shape):
        if layout == "offset":
            return torch.randn(torch.Size(shape).numel() + 1).to(dtype)[1:].view(shape)
        return torch.randn(shape).to(dtype)
    if layout == "fused":
        q = torch.randn(batch, seqlen_q, heads_q + 2, head_dim).to(dtype)[:, :, 2:]
        kv = torch.randn(batch, max_keys, 2 * heads_kv, head_dim).to(dtype)
        k_cache, v_cache = kv[:, :, :heads_kv], kv[:, :, heads_kv:]
        new = torch.randn(batch, seqlen_q, 2 * heads_kv, head_dim).to(dtype)
        k, v = new[:, :, :heads_kv], new[:, :, heads_kv:]
    else:
        q, k_cache, v_cache = make(batch, seqlen_q, heads_q, head_dim), *(make(batch, max_keys, heads_kv, head_dim)
                                                                        for _ in range(2))
        k, v = (make(batch, seqlen_q, heads_kv, head_dim) for _ in range(2))
    return (q, k_cache, v_cache, k, v) if appended else (q, k_cache, v_cache, None, None)


def _check(lib, dtype, seqlen_q, heads_q, heads_kv, head_dim, max_keys, lengths, appended, causal, layout, slots,
           expect_vectorized):
    q, k_cache, v_cache, k, v = _inputs(len(lengths), seqlen_q, heads_q, heads_kv, head_dim, max_keys, dtype,
                                        appended, layout)
    assert vectorized(lib, q, k_cache, v_cache, k, v) == expect_vectorized
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim ** -0.5
    k_ref, v_ref = k_cache.double(), v_cache.double()  # copies: naive writes the new keys in place
    expected = naive.kvcache_attention(q.double(), k_ref, v_ref, cache_seqlens, k if k is None else k.double(),
                                       v if v is None else v.double(), scale, causal)
    out, splits = emulated_kvcache(lib, q, k_cache, v_cache, cache_seqlens, k, v, scale, causal, slots)
    assert_close(out, expected, dtype)
    assert torch.equal(k_cache.double(), k_ref) and torch.equal(v_cache.double(), v_ref), "cache write differs"
    return out, splits


# cache lengths per batch row (S_max 200): empty, one key, odd, one position left (later new keys dropped), past
# the cache and negative (both clamped).
LENGTHS = [0, 1, 37, 199, 300, -5]
CASES = [
    # dtype, head_dim, heads_q, heads_kv, seqlen_q, appended, causal, layout, expect_vectorized
    (torch.float16, 128, 2, 2, 1, True, True, "dense", True),
    (torch.bfloat16, 64, 4, 2, 1, True, True, "fused", True),
    (torch.float16, 32, 8, 2, 3, True, True, "dense", True),
    (torch.float32, 64, 8, 2, 2, False, True, "fused", True),
    (torch.float32, 128, 4, 2, 3, True, False, "dense", True),
    (torch.bfloat16, 256, 4, 1, 1, True, True, "dense", True),
    (torch.float16, 40, 2, 1, 2, True, True, "offset", False),  # padded head dim, misaligned rows: scalar copies
    (torch.float32, 20, 4, 2, 1, False, False, "dense", True),  # padded head dim, whole vectors
    (torch.float16, 7, 4, 4, 3, True, True, "dense", False),  # rows of 14 bytes
]


@pytest.mark.parametrize("dtype,head_dim,heads_q,heads_kv,seqlen_q,appended,causal,layout,expect_vectorized", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}/{c[3]}-sq{c[4]}{'-new' if c[5] else ''}"
                              f"-{'causal' if c[6] else 'full'}-{c[7]}" for c in CASES])
def test_emulated_kernels_match_reference(emulated, dtype, head_dim, heads_q, heads_kv, seqlen_q, appended, causal,
                                          layout, expect_vectorized):
    """A machine 8 times wider than the CTAs: several splits and the merge; as many slots as CTAs: one split, the
    output written by the attend kernel."""
    torch.manual_seed(head_dim * 7 + heads_q)
    units = len(LENGTHS) * heads_kv * math.ceil(heads_q // heads_kv * seqlen_q / 16)  # B x Hk x row blocks of 16 rows
    _, splits = _check(emulated, dtype, seqlen_q, heads_q, heads_kv, head_dim, 200, LENGTHS, appended, causal,
                       layout, 8 * units, expect_vectorized)
    assert splits >= 3  # the cache spans several splits
    _, splits = _check(emulated, dtype, seqlen_q, heads_q, heads_kv, head_dim, 200, LENGTHS, appended, causal,
                       layout, units, expect_vectorized)
    assert splits == 1


def test_group_rows_span_several_row_blocks(emulated):
    """16 query heads per kv head x 3 queries: 48 rows, three row blocks per kv head (one writes the cache)."""
    torch.manual_seed(1)
    _check(emulated, torch.float16, 3, 32, 2, 64, 150, [0, 149, 60], True, True, "dense", 4, True)


def test_empty_shapes_write_nothing(emulated):
    """No cache position (S_max = 0): every query outputs 0; no query (Sq = 0): nothing runs."""
    _check(emulated, torch.float16, 2, 4, 2, 64, 0, [0, 3], True, True, "dense", 2, True)
    q, k_cache, v_cache, k, v = _inputs(2, 0, 4, 2, 64, 10, torch.float16, True, "dense")
    before = k_cache.clone()
    out, _ = emulated_kvcache(emulated, q, k_cache, v_cache, torch.tensor([1, 2], dtype=torch.int32), k, v, 0.1,
                              True, 2)
    assert out.numel() == 0 and torch.equal(k_cache, before)


@pytest.mark.parametrize("units,key_tiles,slots,splits", [
    (132, 64, 132, 1),    # the units fill the machine: no split
    (8, 8, 132, 8),       # B 1 x Hk 8, 256 keys of 32: one split per tile
    (8, 100, 132, 13),    # 15 splits fill 91% of a wave (16 give the same 7 tiles per split): 13 are within 85%
    (2, 3, 4, 2),         # 3 tiles: 2 splits of 2 tiles
    (1, 1000, 264, 28),   # at most kKVCacheMaxSplits = 32 (32 / 264 slots best): 28 are within 85%
])
def test_split_count_follows_occupancy(emulated, units, key_tiles, slots, splits):
    """The split count comes from B x Hk x row blocks against the CTAs the SMs hold (FlashAttention-2's rule), not
    from the cache size alone. fp16 d 128 tiles hold 32 keys; units = B x Hk with one row block each."""
    q = torch.empty(units, 1, 1, 128, dtype=torch.float16)
    k_cache = torch.empty(units, key_tiles * 32, 1, 128, dtype=torch.float16)
    got, split_keys = plan(emulated, q, k_cache, slots)
    assert got == splits
    assert split_keys % 32 == 0 and (got - 1) * split_keys < key_tiles * 32 <= got * split_keys


def test_launcher_rejects_bad_shapes_and_plans(emulated):
    q, k_cache, v_cache, k, v = _inputs(1, 1, 3, 2, 64, 64, torch.float16, True, "dense")  # 3 % 2 != 0
    assert plan(emulated, q, k_cache, 8) == (0, 0)
    q, k_cache, v_cache, k, v = _inputs(1, 1, 2, 2, 64, 128, torch.float16, True, "dense")  # tiles of 64 keys
    lengths = torch.zeros(1, dtype=torch.int32)
    out = torch.empty_like(q)
    # not whole tiles; too few keys; no split; two splits without workspaces
    for bad_plan in ((1, 96), (1, 64), (0, 128), (2, 64)):
        rc = emulated.dpar_emulated_kvcache_forward(DTYPE_CODES[q.dtype], _sizes(q, k_cache), ctypes.c_float(1.0), 1,
                                                    (ctypes.c_int * 2)(*bad_plan), _ptr(q), _ptr(k_cache),
                                                    _ptr(v_cache), _ptr(lengths), _ptr(k), _ptr(v), _ptr(out),
                                                    _ptr(None), _ptr(None), _strides(q, k_cache, v_cache, k, v, out))
        assert rc != 0, bad_plan
