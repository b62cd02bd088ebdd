"""Default backends on CUDA tensors, without a GPU: availability is monkeypatched, so this runs on any machine."""
import pytest
import torch

import dpar_kernels as dk
from dpar_kernels import _dispatch, _extension

CUDA = torch.device("cuda")
OPS = ("token_entropy", "linear_entropy", "patch_gather", "patch_scatter", "varlen_attention", "kvcache_attention")
TRITON_FIRST = ("varlen_attention", "kvcache_attention")


@pytest.fixture
def gpu_backends(monkeypatch, default_backend):
    """Pretends that the CUDA extension and Triton are both usable on CUDA tensors."""
    default_backend(None)
    monkeypatch.setattr(_extension, "HAS_CUDA_OPS", True)
    monkeypatch.setattr(_dispatch, "HAS_TRITON", True)
    return monkeypatch


@pytest.mark.parametrize("op", OPS)
def test_attention_prefers_triton_and_other_ops_cuda(gpu_backends, op):
    expected = "triton" if op in TRITON_FIRST else "cuda"
    assert _dispatch.resolve_backend(op, None, CUDA, dk.BACKENDS) == expected


@pytest.mark.parametrize("op", OPS)
def test_falls_back_when_the_preferred_backend_is_missing(gpu_backends, op):
    gpu_backends.setattr(_dispatch, "HAS_TRITON", False)
    assert _dispatch.resolve_backend(op, None, CUDA, dk.BACKENDS) == "cuda"
    gpu_backends.setattr(_dispatch, "HAS_TRITON", True)
    gpu_backends.setattr(_extension, "HAS_CUDA_OPS", False)
    assert _dispatch.resolve_backend(op, None, CUDA, dk.BACKENDS) == "triton"
    # an op without a Triton kernel for these inputs (e.g. head dim 48 or float64) takes the next one
    assert _dispatch.resolve_backend(op, None, CUDA, ("torch", "cpu")) == "torch"


@pytest.mark.parametrize("op", TRITON_FIRST)
def test_forced_backend_still_wins(gpu_backends, op):
    assert _dispatch.resolve_backend(op, "cuda", CUDA, dk.BACKENDS) == "cuda"
    dk.set_default_backend("cuda")  # the gpu_backends fixture restores the default
    assert _dispatch.resolve_backend(op, None, CUDA, dk.BACKENDS) == "cuda"


def test_cpu_tensors_keep_the_cpu_order(gpu_backends):
    expected = "cpu" if _extension.HAS_CPU_OPS else "torch"
    assert _dispatch.resolve_backend("varlen_attention", None, torch.device("cpu"), dk.BACKENDS) == expected
