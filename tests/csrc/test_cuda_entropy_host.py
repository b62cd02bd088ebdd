"""The CUDA token_entropy kernel (csrc/cuda/entropy.cu) run on the host against the float64 reference (no GPU).

tests/csrc/cuda_host/entropy_emulation.cpp runs every thread of a block as an OS thread (barriers for __syncthreads,
an exchange buffer for warp shuffles), so the kernel's own code, including its 16-byte vector loads, the scalar
prologue that reaches alignment, the per-thread online state and the warp/block merges, is what is checked here.
"""
import ctypes
import os

import pytest
import torch
from helpers import ROOT, assert_close
from test_cuda_attention_host import build_emulation

from dpar_kernels.entropy import naive

EMULATION = os.path.join(ROOT, "tests", "csrc", "cuda_host", "entropy_emulation.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # dpar::DType
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernel as a ctypes library (C++20 for std::barrier; the kernel's vector loads pun types)."""
    return build_emulation(tmp_path_factory, EMULATION, ("-std=c++20", "-fno-strict-aliasing", "-pthread"))


def emulated_entropy(lib, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 [rows] from the CUDA kernel run on the host; logits [rows, V] with unit column stride."""
    assert logits.stride(1) == 1
    out = torch.full((logits.shape[0],), NAN)
    rc = lib.dpar_emulated_token_entropy(DTYPE_CODES[logits.dtype], ctypes.c_void_p(logits.data_ptr()),
                                         ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(logits.shape[0]),
                                         ctypes.c_int64(logits.shape[1]), ctypes.c_int64(logits.stride(0)),
                                         ctypes.c_float(1.0 / temperature))
    assert rc == 0, f"launcher returned cudaError {rc}"
    return out


def reference(logits, temperature=1.0):
    return naive.token_entropy(logits.double(), temperature)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [7, 1000, 2049, 5000])  # one warp per row up to 2048, one block above
def test_emulated_kernel_matches_reference(emulated, dtype, vocab):
    logits = (torch.randn(11, vocab + 3) * 2.5).to(dtype)[:, 3:]  # rows start off 16-byte alignment
    logits[2, ::3] = -INF  # a masked vocabulary
    assert_close(emulated_entropy(emulated, logits, 0.7), reference(logits, 0.7), dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("vocab", [64, 4096])
def test_nan_gives_nan_wherever_it_is(emulated, dtype, vocab):
    """A NaN anywhere in a row gives NaN, also when the first vector of a thread holds only NaN (and -inf), which
    raises no running maximum (fmaxf ignores NaN); a row of -inf only has no distribution: NaN too."""
    rows = torch.randn(6, vocab)
    rows[0, :] = NAN  # all NaN
    rows[1, :16] = NAN  # the first vector of several threads all NaN, finite values after it
    rows[2, :8] = -INF
    rows[2, 8:16] = NAN  # NaN mixed with -inf, then finite values
    rows[3, -1] = NAN  # a NaN in the scalar tail / last vector
    rows[4, :] = -INF
    logits = rows.to(dtype)
    out = emulated_entropy(emulated, logits)
    assert torch.isnan(out[:5]).all(), out
    assert torch.isfinite(out[5])
    assert_close(out, reference(logits), dtype)  # the NaN pattern must match the reference exactly
