"""Triton varlen attention (run by the interpreter on CPU tensors) against the float64 reference.

Checks out, lse and dq/dk/dv for fp32 (IEEE dots: ~1e-5) and fp16 (~1e-2) over ragged batches with empty and
one-token sequences, a long sequence among short ones, decoding (Lq < Lk), queries that see no key, one-query
cross-attention, GQA, non-contiguous q/k/v and NaN-poisoned output buffers. bf16 is not run here: the
interpreter mishandles it. Shapes stay tiny because the interpreter is slow. One test compiles the kernels for
an H100 (sm_90a, bf16 included) with Triton's bundled ptxas, which needs no GPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TOLERANCE, assert_close, cu_from_lengths, rel_error, triton_on_cpu

import dpar_kernels as dk
from dpar_kernels.attention import naive

pytestmark = pytest.mark.skipif(not triton_on_cpu(),
                                reason="triton is not installed, or a GPU is present so the interpreter is off")

DTYPES = (torch.float32, torch.float16)


def _inputs(lengths_q, lengths_k, hq, hk, d, dtype, fused=False):
    """Random q [Tq, hq, d], k/v [Tk, hk, d] (leaves requiring grad) and their cu_seqlens.

    fused=True (needs lengths_q == lengths_k) slices q, k, v out of one [T, hq + 2 hk, d + 8] tensor, so token
    and head strides are not those of a contiguous tensor."""
    cu_q, cu_k = cu_from_lengths(lengths_q), cu_from_lengths(lengths_k)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    if fused:
        assert total_q == total_k
        qkv = torch.randn(total_q, hq + 2 * hk, d + 8, dtype=dtype)
        q, k, v = qkv[:, :hq, :d], qkv[:, hq:hq + hk, :d], qkv[:, hq + hk:, :d]
        assert not q.is_contiguous() and q.stride(-1) == 1
    else:
        q = torch.randn(total_q, hq, d, dtype=dtype)
        k, v = torch.randn(total_k, hk, d, dtype=dtype), torch.randn(total_k, hk, d, dtype=dtype)
    return [t.detach().requires_grad_() for t in (q, k, v)] + [cu_q, cu_k]


def _reference(q, k, v, dout, cu_q, cu_k, max_q, max_k, causal, scale=None):
    """float64 (out, lse, (dq, dk, dv)) of naive.py; scale defaults to 1/sqrt(d)."""
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    scale = q.shape[2] ** -0.5 if scale is None else scale
    out, lse = naive.varlen_attention(q64, k64, v64, cu_q, cu_k, max_q, max_k, scale, causal)
    grads = naive.varlen_attention_backward(dout.double(), q64, k64, v64, out, lse, cu_q, cu_k, max_q, max_k,
                                            scale, causal)
    return out, lse, grads


def _check(lengths_q, lengths_k, *, hq=2, hk=1, d=32, dtype=torch.float32, causal=True, fused=False):
    """Runs dk.varlen_attention(backend="triton") forward and backward and compares with the reference."""
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, hq, hk, d, dtype, fused)
    max_q, max_k = max(lengths_q, default=0), max(lengths_k, default=0)
    out, lse = dk.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, backend="triton",
                                   return_lse=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, cu_q, cu_k, max_q, max_k, causal)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, q.shape[0])
    for name, got in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        assert not torch.isnan(got).any(), f"NaN in {name}"
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, torch.float32)  # scores accumulate in fp32 for every input dtype
    for got, ref, like in zip(grads, ref_grads, (q, k, v)):
        assert got.dtype == dtype and got.shape == like.shape
        assert_close(got, ref, dtype)
    return out, lse, grads


@pytest.mark.parametrize("d", [32, 64, 80])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_batch_with_gqa(dtype, causal, d):
    _check([0, 1, 5, 19, 2], [0, 1, 5, 19, 2], hq=4, hk=2, d=d, dtype=dtype, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_one_long_sequence_among_short(causal):
    _check([2, 1, 45, 0, 3], [2, 1, 45, 0, 3], hq=2, hk=1, d=64, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoding_fewer_queries_than_keys(dtype):
    """Bottom-right causal alignment: the last query sees every key (KV-cache decoding); no keys at all too."""
    _check([1, 3, 2, 0, 2], [20, 5, 33, 4, 0], hq=2, hk=2, d=32, dtype=dtype, causal=True)


def test_queries_that_see_no_key_give_zero_and_minus_inf():
    """Lq > Lk causal: the first Lq - Lk queries see nothing; with Lk = 0 no query sees anything."""
    out, lse, (dq, _, _) = _check([6, 3], [2, 0], hq=2, hk=1, d=32, causal=True)
    blind = torch.tensor([True] * 4 + [False] * 2 + [True] * 3)
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
    assert bool((lse[:, blind] == float("-inf")).all()) and bool(torch.isfinite(lse[:, ~blind]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_attention_one_query_per_segment(dtype):
    """The DPAR patch cross-attention: each patch query attends (non-causal) to its 1..4 tokens."""
    lengths_k = [1, 4, 2, 3, 4, 1, 2, 3, 4, 4, 1, 2]
    _check([1] * len(lengths_k), lengths_k, hq=2, hk=2, d=64, dtype=dtype, causal=False)


@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_slices_of_fused_qkv(causal):
    _check([3, 18, 0, 7], [3, 18, 0, 7], hq=2, hk=1, d=32, causal=causal, fused=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype, d", [(torch.float32, 64), (torch.float16, 128)])
def test_gpu_tile_table(monkeypatch, dtype, d, causal):
    """The interpreter otherwise runs 16 x 16 tiles; here it runs the H100 table's unequal, larger tiles."""
    from dpar_kernels.attention import triton_kernels

    monkeypatch.setattr(triton_kernels, "triton_interpreter", lambda: False)
    tiles = {kind: triton_kernels._tiles(kind, torch.empty(0, 1, d, dtype=dtype), 45, 50)
             for kind in ("forward", "dkdv", "dq")}
    assert len({(t.m, t.n) for t in tiles.values()}) > 1 and any(t.m != t.n for t in tiles.values())
    _check([2, 45, 0, 17], [3, 50, 4, 17], hq=2, hk=1, d=d, dtype=dtype, causal=causal)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 32), (torch.float16, 128)])
def test_gpu_tiles_shrink_to_short_sequences(monkeypatch, dtype, d):
    """The GPU tile table sized from max_seqlen_q and max_seqlen_k: one query over at most 5 keys runs 16 x 16
    tiles in every kernel (forward, dK/dV, dQ), a long side keeps its table size, a short one shrinks alone."""
    from dpar_kernels.attention import triton_kernels

    monkeypatch.setattr(triton_kernels, "triton_interpreter", lambda: False)
    q = torch.empty(0, 1, d, dtype=dtype)
    for kind, table in triton_kernels._GPU_TILES.items():
        base = table[(dtype == torch.float32, d > 64)]
        assert (triton_kernels._tiles(kind, q, 1, 5).m, triton_kernels._tiles(kind, q, 1, 5).n) == (16, 16), kind
        assert triton_kernels._tiles(kind, q, 1, 4096) == triton_kernels._Tiles(16, base.n, base.warps, base.stages)
        assert triton_kernels._tiles(kind, q, 4096, 2) == triton_kernels._Tiles(base.m, 16, base.warps, base.stages)
        assert triton_kernels._tiles(kind, q, 4096, 4096) == base


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_over_0_1_2_5_keys(dtype, causal):
    """The short-tile launch (grids of one 16-row block per sequence) with empty and 1..5-key sequences, a query
    head group and strided k, v."""
    q, kv, cu_q, cu_k = _strided_one_query_inputs([0, 1, 2, 5, 3, 1], heads_q=4, heads_kv=2, d=32, dtype=dtype)
    k, v = kv.chunk(2, dim=1)
    out = dk.varlen_attention(q, k, v, cu_q, cu_k, 1, 5, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, kv), dout)
    ref_out, _, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, dout, cu_q, cu_k, 1, 5, causal)
    assert_close(out, ref_out, dtype)
    assert_close(grads[0], ref_dq, dtype)
    assert_close(grads[1], torch.cat([ref_dk, ref_dv], 1), dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the query over no key


def _strided_one_query_inputs(lengths_k, heads_q, heads_kv, d, dtype):
    """One query per sequence; kv [Tk, 2 * heads_kv, d] a leaf whose halves are k and v."""
    kv = torch.randn(sum(lengths_k), 2 * heads_kv, d, dtype=dtype, requires_grad=True)
    q = torch.randn(len(lengths_k), heads_q, d, dtype=dtype, requires_grad=True)
    return q, kv, cu_from_lengths([1] * len(lengths_k)), cu_from_lengths(lengths_k)


@pytest.mark.parametrize("d", [96, 128])
def test_forward_other_head_dims(d):
    lengths = [1, 7, 20]
    q, k, v, cu_q, cu_k = _inputs(lengths, lengths, 2, 1, d, torch.float16)
    with torch.no_grad():
        out, lse = dk.varlen_attention(q, k, v, cu_q, cu_k, 20, 20, backend="triton", return_lse=True)
    ref_out, ref_lse, _ = _reference(q, k, v, torch.zeros_like(q), cu_q, cu_k, 20, 20, True)
    assert_close(out, ref_out, torch.float16)
    assert_close(lse, ref_lse, torch.float32)


def test_backward_is_deterministic():
    """dk/dv sum the query heads of a GQA group inside one program (no atomics): bitwise reproducible."""
    q, k, v, cu_q, cu_k = _inputs([9, 30], [9, 30], 4, 1, 32, torch.float32)
    runs = []
    for _ in range(2):
        out = dk.varlen_attention(q, k, v, cu_q, cu_k, 30, 30, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("causal", [True, False])
def test_every_output_element_is_written(causal):
    """Kernels write into NaN-poisoned buffers: sequences with no queries, no keys, or queries that see nothing
    must still get their zeros written."""
    from dpar_kernels.attention import triton_kernels

    lengths_q, lengths_k = [0, 4, 3, 5, 0], [5, 4, 0, 2, 0]
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 2, 1, 80, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    scale = 80 ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, q.shape[0]), float("nan"))
    triton_kernels.forward_into(q, k, v, cu_q, cu_k, 5, 5, scale, causal, out, lse)
    dout = torch.randn_like(q)
    dq, dk_, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    triton_kernels.backward_into(dout, q, k, v, out, lse, cu_q, cu_k, 5, 5, scale, causal, dq, dk_, dv)

    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, cu_q, cu_k, 5, 5, causal)
    for got in (out, lse, dq, dk_, dv):
        assert not torch.isnan(got).any()
    assert_close(out, ref_out, torch.float32)
    assert_close(lse, ref_lse, torch.float32)
    for got, ref in zip((dq, dk_, dv), ref_grads):
        assert_close(got, ref, torch.float32)
    assert torch.equal(dk_[:5], torch.zeros_like(dk_[:5]))  # keys of a sequence without queries


def test_empty_batch():
    q, k, v, cu_q, cu_k = _inputs([0, 0], [0, 0], 2, 1, 32, torch.float32)
    out = dk.varlen_attention(q, k, v, cu_q, cu_k, 0, 0, backend="triton")
    assert out.shape == (0, 2, 32)
    dq, dk_, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and dk_.shape == k.shape and dv.shape == v.shape


def test_unsupported_head_dim_raises():
    q, k, v, cu_q, cu_k = _inputs([3], [3], 2, 1, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        dk.varlen_attention(q, k, v, cu_q, cu_k, 3, 3, backend="triton")
    from dpar_kernels.attention import triton_kernels

    with pytest.raises(ValueError, match="head dims"):
        triton_kernels.varlen_attention(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 3, 3, 0.1, True)


def test_float64_raises():
    from dpar_kernels.attention import triton_kernels

    q, k, v, cu_q, cu_k = _inputs([3], [3], 2, 1, 32, torch.float64)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        dk.varlen_attention(q, k, v, cu_q, cu_k, 3, 3, backend="triton")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):  # the backend guards direct callers too
        triton_kernels.varlen_attention(q.detach(), k.detach(), v.detach(), cu_q, cu_k, 3, 3, 0.1, True)


def test_softmax_scale_is_used():
    q, k, v, cu_q, cu_k = _inputs([5, 9], [5, 9], 2, 1, 32, torch.float32)
    with torch.no_grad():
        out = dk.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, softmax_scale=0.5, backend="triton")
    ref_out, _, _ = _reference(q, k, v, torch.zeros_like(q), cu_q, cu_k, 9, 9, True, scale=0.5)
    default_out, _, _ = _reference(q, k, v, torch.zeros_like(q), cu_q, cu_k, 9, 9, True)
    assert_close(out, ref_out, torch.float32)
    assert rel_error(out, default_out) > 100 * TOLERANCE[torch.float32]


def _has_nvidia_compiler() -> bool:
    if not triton_on_cpu():
        return False
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_nvidia_compiler(), reason="triton's NVIDIA backend (ptxas) is not installed")
@pytest.mark.parametrize("flags", [["--arch", "90"], ["--arch", "86", "--shared-memory-only"]],
                         ids=["sm90-no-spills", "sm86-fits-99KB"])
def test_kernels_compile_for_gpu_archs(flags):
    """What the interpreter cannot see: GPU compile errors, bf16 lowering, register spills of the tile table on an
    H100 (as specialised at launch) and its shared memory on the 99 KB archs (sm_86/sm_89)."""
    script = Path(ROOT) / "scripts" / "triton_attention_ptxas.py"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), "--quick", *flags], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
