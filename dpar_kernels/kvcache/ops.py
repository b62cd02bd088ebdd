"""Public KV-cache attention for incremental decoding (flash-attn's flash_attn_with_kvcache layout).

A mutating op (k_cache and v_cache, when new keys are given), forward only. The cpu and cuda backends trace as the
C++ op torch.ops.dpar_C.kvcache_attention itself inside torch.compile graphs (extension_traced: no Python work per
call in a compiled decode step); the torch and triton backends run as the Python custom op dpar::kvcache_attention.
No backend reads cache_seqlens on the host; every kernel clamps it (see naive.py for the exact semantics).
"""
import math

import torch

from .._checks import (
    check_finite,
    check_float,
    check_same_device,
    check_tensor,
    last_dim_contiguous,
    supported_backends,
)
from .._ops import Prepared, define_op, extension_kernel, reject_grad, triton_kernel
from ..constants import KVCACHE_MAX_HEAD_DIM
from . import naive, torch_backend

SCHEMA = ("(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k, Tensor? v, "
          "float softmax_scale, bool causal) -> Tensor")


def _fake(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale, causal):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _validate(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale, causal, *, backend) -> Prepared:
    """The argument contract of kvcache_attention (see its docstring); each attribute is read once: this runs on
    every decode step."""
    check_float("q", q, ndim=4)
    check_float("k_cache", k_cache, ndim=4)
    check_float("v_cache", v_cache, ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, ndim=1)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (or both None)")
    if k is not None:
        check_float("k", k, ndim=4)
        check_float("v", v, ndim=4)
    device = check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, k=k, v=v)
    dtype, (batch, seqlen_q, heads_q, head_dim), cache_shape = q.dtype, q.shape, k_cache.shape
    if v_cache.shape != cache_shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(cache_shape)} and "
                         f"{tuple(v_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{name} must have q's dtype {dtype}, got {t.dtype}")
    if cache_shape[0] != batch or cache_shape[3] != head_dim:
        raise ValueError(f"k_cache must be [B={batch}, S_max, Hk, d={head_dim}], got {tuple(cache_shape)}")
    heads_kv = cache_shape[2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"the number of query heads ({heads_q}) must be a multiple of k_cache's heads ({heads_kv})")
    if k is not None:
        expected = (batch, seqlen_q, heads_kv, head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.shape != expected:
                raise ValueError(f"{name} must be [B, Sq, Hk, d] = {expected}, got {tuple(t.shape)}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {str(cache_seqlens.dtype).replace('torch.', '')}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have B={batch} entries, got {cache_seqlens.shape[0]}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride()[-1] != 1:
            raise ValueError(f"{name} must have a contiguous last dim (it is updated in place)")
    reject_grad("kvcache_attention", q=q, k=k, v=v)
    supported = supported_backends(KVCACHE_ATTENTION, backend, dtype, "tensors",
                                   kernel_ok=head_dim <= KVCACHE_MAX_HEAD_DIM,
                                   kernel_limit=(f"head dim {head_dim}", f"at most {KVCACHE_MAX_HEAD_DIM}"))
    scale = (1.0 / math.sqrt(max(head_dim, 1)) if softmax_scale is None  # d = 0: an empty output, any scale
             else check_finite("softmax_scale", softmax_scale))
    args = (last_dim_contiguous(q), k_cache, v_cache, cache_seqlens.contiguous(),  # kernels read it as raw memory
            last_dim_contiguous(k), last_dim_contiguous(v), scale, bool(causal))
    return Prepared(args, device, supported, "decode")


KVCACHE_ATTENTION = define_op(
    "kvcache_attention", schema=SCHEMA, validate=_validate, fake=_fake, mutates_args=("k_cache", "v_cache"),
    extension_traced=True, reference=naive.kvcache_attention,
    backends={"torch": torch_backend.kvcache_attention,
              "cpu": extension_kernel("kvcache_attention"),
              "cuda": extension_kernel("kvcache_attention"),
              "triton": triton_kernel("kvcache.triton_kernels", "kvcache_attention")})


def kvcache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                      k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                      softmax_scale: float | None = None, causal: bool = True,
                      backend: str | None = None) -> torch.Tensor:
    """Attention of new queries over a preallocated KV cache (flash_attn_with_kvcache layout).

    q [B, Sq, Hq, d]; k_cache, v_cache [B, S_max, Hk, d] with Hq % Hk == 0 (updated in place when k, v are
    given); cache_seqlens int32 [B] on the data's device: keys already cached per row (never read on the host,
    never changed). k, v [B, Sq, Hk, d] (optional) are written at positions [cache_seqlens[b], +Sq) before
    attending; positions at or past S_max are dropped. causal: query i of row b sees keys
    [0, cache_seqlens[b] + i] (with k) / [0, cache_seqlens[b] - Sq + i] (without), clamped to S_max.
    Same float dtype everywhere (fp32/fp16/bf16; fp64 on torch/cpu); the caches need a contiguous last dim.
    Returns out [B, Sq, Hq, d] in q's dtype; a query that sees no key gets 0. Forward only.
    """
    return KVCACHE_ATTENTION(q, k_cache, v_cache, cache_seqlens, k, v, softmax_scale, causal, backend=backend)
