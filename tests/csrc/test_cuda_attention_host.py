"""Host-side checks of the CUDA attention kernels (no GPU needed).

1. csrc/cuda/attention_tiles.h holds everything the kernels compute about which (query, key) tiles to visit and
   where each tile lives in shared memory. tests/csrc/cuda_host/attention_tiles_check.cpp compares it against a
   brute-force definition of bottom-right causal masking; it is built with nvcc (as CUDA, so the __host__ __device__
   path is the one compiled) and with the host C++ compiler, and run.
2. tests/csrc/cuda_host/attention_emulation.cpp runs the kernels of csrc/cuda/attention_kernels.cuh themselves on the
   host (fibers for threads, emulated wmma); their outputs and gradients are compared with naive.py in float64.
"""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch
from helpers import ROOT, assert_close, cu_from_lengths

from dpar_kernels.attention import naive

SOURCE = os.path.join(ROOT, "tests", "csrc", "cuda_host", "attention_tiles_check.cpp")
HEADER = os.path.join(ROOT, "csrc", "cuda", "attention_tiles.h")


def _compilers():
    """(name, command prefix) of each available compiler able to build the check program."""
    found = []
    if shutil.which("nvcc"):
        found.append(("nvcc", ["nvcc", "-std=c++17", "-O2", "-x", "cu"]))
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx:
        found.append(("host", [cxx, "-std=c++17", "-O2", "-Wall", "-Werror"]))
    return found


@pytest.mark.parametrize("compiler", _compilers() or [pytest.param(None, marks=pytest.mark.skip("no compiler"))],
                         ids=lambda c: c[0] if c else "none")
def test_attention_tile_math(tmp_path, compiler):
    _, command = compiler
    binary = tmp_path / "attention_tiles_check"
    build = subprocess.run([*command, f"-I{os.path.join(ROOT, 'csrc')}", SOURCE, "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("all checks passed"), run.stdout + run.stderr


def test_header_is_torch_and_cuda_free():
    """The tile header must stay includable by plain host C++ (the check program relies on it)."""
    with open(HEADER) as f:
        includes = [line for line in f if line.startswith("#include")]
    assert includes == [], includes


# ---------------------------------------------------------------------------------------------------------------
# The kernels themselves, run by the host emulation (tests/csrc/cuda_host/attention_emulation.cpp) against naive.py.

EMULATION = os.path.join(ROOT, "tests", "csrc", "cuda_host", "attention_emulation.cpp")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # dpar::DType


def _cuda_include_dir():
    """A directory holding cuda_runtime.h and cuda_fp16.h (the emulation needs their types), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    for root in filter(None, roots):
        include = os.path.join(root, "include")
        if all(os.path.exists(os.path.join(include, h)) for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return include
    return None


def build_emulation(tmp_path_factory, source: str, flags=("-std=c++17",)) -> ctypes.CDLL:
    """Builds a host emulation source (tests/csrc/cuda_host) as a ctypes library (skips without a host compiler or the
    CUDA headers)."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    library = tmp_path_factory.mktemp("emulation") / (os.path.splitext(os.path.basename(source))[0] + ".so")
    build = subprocess.run([cxx, *flags, "-O2", "-shared", "-fPIC", "-Wall", "-Wno-attributes",
                            "-Wno-unknown-pragmas", f"-I{os.path.join(ROOT, 'csrc')}", "-isystem", include, source,
                            "-o", str(library)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernels as a ctypes library."""
    return build_emulation(tmp_path_factory, EMULATION)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _strides(*tensors):
    values = [s for t in tensors for s in (t.stride(0), t.stride(1))]
    return (ctypes.c_int64 * len(values))(*values)


def _shape_args(q, k, cu_q, cu_k, max_q, max_k, scale, causal):
    return (DTYPE_CODES[q.dtype], _ptr(cu_q), _ptr(cu_k), cu_q.numel() - 1, q.shape[1], k.shape[1], q.shape[2], max_q,
            max_k, ctypes.c_int64(q.shape[0]), ctypes.c_float(scale), int(causal))


def emulated_forward(lib, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    """-> out, lse from the CUDA forward kernel run on the host; outputs start as NaN."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"))
    rc = lib.dpar_emulated_forward(*_shape_args(q, k, cu_q, cu_k, max_q, max_k, scale, causal), _ptr(q), _ptr(k),
                                   _ptr(v), _ptr(out), _ptr(lse), _strides(q, k, v, out))
    assert rc == 0, f"forward launcher returned cudaError {rc}"
    return out, lse


def emulated_backward(lib, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    """-> dq, dk, dv from the CUDA backward kernels run on the host; outputs and workspace start as NaN."""
    dq, dk, dv = (torch.full(t.shape, float("nan"), dtype=t.dtype) for t in (q, k, v))
    delta = torch.full((q.shape[1], q.shape[0]), float("nan"))
    rc = lib.dpar_emulated_backward(*_shape_args(q, k, cu_q, cu_k, max_q, max_k, scale, causal), _ptr(dout), _ptr(q),
                                    _ptr(k), _ptr(v), _ptr(out), _ptr(lse), _ptr(dq), _ptr(dk), _ptr(dv),
                                    _ptr(delta), _strides(dout, q, k, v, out, dq, dk, dv))
    assert rc == 0, f"backward launcher returned cudaError {rc}"
    return dq, dk, dv


def _packed(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, fused):
    """Random q, k, v (k/v as slices of one fused [T, 2 * Hk, d] tensor when fused) and their offsets."""
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q = torch.randn(total_q, heads_q, head_dim).to(dtype)
    if fused:
        q = torch.randn(total_q, heads_q + 3, head_dim).to(dtype)[:, 1:heads_q + 1]
        kv = torch.randn(total_k, 2 * heads_kv, head_dim).to(dtype)
        k, v = kv[:, :heads_kv], kv[:, heads_kv:]
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    else:
        k, v = (torch.randn(total_k, heads_kv, head_dim).to(dtype) for _ in range(2))
    return q, k, v, cu_from_lengths(lengths_q), cu_from_lengths(lengths_k)


# Lengths cover: empty query and key sequences, Lq > Lk (queries that see no key when causal), Lq < Lk, one token,
# and sequences spanning several forward (64 or 32 rows) and backward (32 rows) tiles.
MIXED = ([3, 0, 70, 1, 5, 4], [5, 4, 67, 0, 2, 4])
CASES = [
    # dtype, head_dim, heads_q, heads_kv, causal, lengths, fused
    (torch.float32, 64, 4, 2, True, MIXED, False),
    (torch.float32, 96, 2, 1, False, ([1, 1, 1, 0, 1], [4, 1, 9, 3, 0]), True),  # patch cross-attention shape
    (torch.float16, 32, 2, 1, False, MIXED, False),
    (torch.float16, 128, 2, 2, True, ([70], [70]), True),
    (torch.bfloat16, 80, 2, 2, True, MIXED, True),
    (torch.float16, 64, 1, 1, True, ([200, 1, 1], [130, 1, 0]), False),  # 70 blind queries, many tiles each way
    # at most 16 queries per sequence: the short plans (16-row blocks), with blind rows and 2 key blocks
    (torch.float16, 64, 4, 2, True, ([16, 3, 0, 1, 9], [5, 40, 2, 1, 70]), False),
    (torch.float32, 32, 2, 2, False, ([16, 1, 2, 1], [0, 33, 5, 2]), True),
]


@pytest.mark.parametrize("dtype,head_dim,heads_q,heads_kv,causal,lengths,fused", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-h{c[2]}/{c[3]}-{'causal' if c[4] else 'full'}"
                              f"{'-strided' if c[6] else ''}" for c in CASES])
def test_emulated_kernels_match_reference(emulated, dtype, head_dim, heads_q, heads_kv, causal, lengths, fused):
    q, k, v, cu_q, cu_k = _packed(*lengths, heads_q, heads_kv, head_dim, dtype, fused)
    max_q, max_k = max(lengths[0]), max(lengths[1])
    scale = head_dim ** -0.5
    out, lse = emulated_forward(emulated, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out_ref, lse_ref = naive.varlen_attention(q64, k64, v64, cu_q, cu_k, max_q, max_k, scale, causal)
    assert_close(out, out_ref, dtype)
    assert_close(lse, lse_ref, dtype)  # also checks that -inf (queries seeing no key) matches exactly
    blind_queries = any(lq > lk if causal else lq > 0 == lk for lq, lk in zip(*lengths))
    assert torch.isinf(lse_ref).any() == blind_queries  # the case really has queries that see no key

    dout = torch.randn(q.shape).to(dtype)
    dq, dk, dv = emulated_backward(emulated, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal)
    grads_ref = naive.varlen_attention_backward(dout.double(), q64, k64, v64, out_ref, lse_ref, cu_q, cu_k, max_q,
                                                max_k, scale, causal)
    for name, actual, expected in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref):
        assert not torch.isnan(actual).any(), f"{name} has rows the kernels never wrote"
        assert_close(actual, expected, dtype, factor=2.0 if dtype == torch.bfloat16 else 1.0)


def test_emulated_launcher_rejects_unsupported_head_dim(emulated):
    q, k, v, cu_q, cu_k = _packed([2], [2], 1, 1, 48, torch.float32, False)
    out = torch.zeros_like(q)
    lse = torch.zeros(1, 2)
    rc = emulated.dpar_emulated_forward(*_shape_args(q, k, cu_q, cu_k, 2, 2, 1.0, True), _ptr(q), _ptr(k), _ptr(v),
                                        _ptr(out), _ptr(lse), _strides(q, k, v, out))
    assert rc != 0  # cudaErrorInvalidValue
