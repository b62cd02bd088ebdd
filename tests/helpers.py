"""Shared test utilities: tolerances per dtype, poisoned outputs, random ragged batches, backend lists."""
import os

import pytest
import torch

import dpar_kernels as dk
from dpar_kernels import _dispatch, _extension

TESTS = os.path.dirname(os.path.abspath(__file__))  # tests/: data/ and the layer folders
ROOT = os.path.dirname(TESTS)  # the repository

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(max |e|, tiny), computed in float64; NaN/inf must match exactly."""
    a, e = actual.double(), expected.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "NaN pattern differs"
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)]), "inf pattern differs"
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp(min=1e-6)).item()


def assert_close(actual, expected, dtype, factor: float = 1.0):
    err = rel_error(actual, expected)
    assert err <= TOLERANCE[dtype] * factor, f"relative error {err:.3g} > {TOLERANCE[dtype] * factor:.3g} ({dtype})"


def cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors here (triton only with TRITON_INTERPRET=1)."""
    return dk.available_backends(torch.device("cpu"))


def triton_on_cpu() -> bool:
    """True when Triton kernels run on CPU tensors here: triton installed and its interpreter on (conftest turns it
    on where no GPU is present)."""
    return _dispatch.HAS_TRITON and _dispatch.triton_interpreter()


def random_lengths(n: int, low: int, high: int, generator=None) -> torch.Tensor:
    return torch.randint(low, high + 1, (n,), generator=generator, dtype=torch.int32)


def cu_from_lengths(lengths) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int32)
    return dk.lengths_to_cu_seqlens(lengths)


# Tests of the C++ backend itself; the extension exists wherever a C++ compiler built it, and CI requires it
# (DPAR_REQUIRE_EXTENSION=1 makes tests/packaging/test_build.py fail when the build failed).
requires_extension = pytest.mark.skipif(not _extension.HAS_CPU_OPS,
                                        reason="dpar_kernels._C was not built (no C++ compiler or a failed build)")


# The GPU tests (tests/ops/test_gpu_kernels.py, tests/model/test_gpu_model.py): marked ``gpu`` (scripts/gpu_check.sh
# runs them), skipped without CUDA; DPAR_GPU_TESTS_DEVICE=cpu is their CPU dry run (Triton interpreted).
GPU_DEVICE = torch.device(os.environ.get("DPAR_GPU_TESTS_DEVICE", "cuda"))
GPU_DRY_RUN = GPU_DEVICE.type == "cpu"
GPU_BACKENDS = ("cuda", "triton")
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(GPU_DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                                 reason="needs a CUDA GPU"),
             pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy's log(0) notes in the dry run
