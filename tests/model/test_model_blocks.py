"""Building blocks: axial RoPE is relative per axis, the KV cache equals packed causal attention."""
import torch
from helpers import assert_close
from model_utils import single_thread  # noqa: F401

import dpar_kernels as dk
from dpar.model.blocks import AxialRope, apply_rope
from dpar.model.kv_cache import KVCache


def test_axial_rope_depends_only_on_position_differences():
    rope = AxialRope(head_dim=16, axes=3)
    q, k = torch.randn(1, 2, 16, dtype=torch.float64), torch.randn(1, 2, 16, dtype=torch.float64)

    def score(pos_q, pos_k):
        rq = rope(torch.tensor([pos_q]), torch.float64)
        rk = rope(torch.tensor([pos_k]), torch.float64)
        return (apply_rope(q, rq) * apply_rope(k, rk)).sum(-1)

    assert_close(score([3, 1, 2], [1, 0, 0]), score([5, 4, 7], [3, 3, 5]), torch.float64)
    assert not torch.allclose(score([3, 1, 2], [1, 0, 0]), score([3, 1, 3], [1, 0, 0]))  # col_end matters
    rotated = apply_rope(q, rope(torch.tensor([[2, 5, 9]]), torch.float64))
    assert_close(rotated.norm(dim=-1), q.norm(dim=-1), torch.float64)
    assert torch.equal(apply_rope(q, rope(torch.zeros(1, 3, dtype=torch.long), torch.float64)), q)


def test_apply_rope_rotates_each_adjacent_pair():
    """The complex multiplication equals the pair rotation written out, in float64, on strided q/k views."""
    torch.manual_seed(0)
    qkv = torch.randn(6, 5, 8, dtype=torch.float64)
    x = qkv[:, :3]  # a q/k slice of a fused projection: not contiguous
    positions = torch.randint(0, 9, (6, 2))
    rope = AxialRope(head_dim=8, axes=2)(positions, torch.float64)
    cos, sin = rope.real[:, None], rope.imag[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    assert_close(apply_rope(x, rope), expected, torch.float64)
    assert rope.dtype == torch.complex128
    assert AxialRope(head_dim=8, axes=2)(positions, torch.bfloat16).dtype == torch.complex64


def _attend_step(cache, rows, q, k, v):
    cache.begin(rows)
    out = cache.attend(0, torch.stack(q), torch.stack(k), torch.stack(v))
    cache.commit()
    return out


def test_kv_cache_matches_packed_causal_attention():
    """Appending one token to a varying subset of rows per step (others idle) equals one causal pass over the
    full sequences."""
    lengths, heads, kv_heads, dim = [5, 0, 7, 3], 4, 2, 8
    q = [torch.randn(n, heads, dim, dtype=torch.float64) for n in lengths]
    k = [torch.randn(n, kv_heads, dim, dtype=torch.float64) for n in lengths]
    v = [torch.randn(n, kv_heads, dim, dtype=torch.float64) for n in lengths]
    cu = dk.lengths_to_cu_seqlens(torch.tensor(lengths))
    expected = dk.varlen_attention(torch.cat(q), torch.cat(k), torch.cat(v), cu, cu, 7, 7, causal=True)
    expected = list(expected.split(lengths))

    cache = KVCache(1, len(lengths), 8, kv_heads, dim, torch.float64, torch.device("cpu"))
    done, step = [0] * len(lengths), 0
    while done != lengths:  # one token for a varying subset of rows, in a varying order, per step
        rows = [b for b in (2, 0, 3, 1) if done[b] < lengths[b]][::(-1) ** step][:max(1, 3 - step % 3)]
        index = torch.tensor(rows)
        out = _attend_step(cache, index, [q[b][done[b]] for b in rows], [k[b][done[b]] for b in rows],
                           [v[b][done[b]] for b in rows])
        for part, b in zip(out, rows):
            assert_close(part, expected[b][done[b]], torch.float64)
            done[b] += 1
        step += 1
    assert done == lengths and cache.lengths.tolist() == lengths
