import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Triton picks the interpreter when a kernel is defined, so it must be on before dpar_kernels' Triton modules load.
# With it on, backend="triton" runs on CPU tensors; backend=None still never picks triton for CPU tensors.
# On a machine with a GPU the Triton kernels compile for real (set TRITON_INTERPRET=1 yourself to force the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def default_backend():
    """dk.set_default_backend for one test (what DPAR_BACKEND does at import); the old default comes back after."""
    import dpar_kernels as dk

    previous = dk.default_backend()
    yield dk.set_default_backend
    dk.set_default_backend(previous)


@pytest.fixture
def validation():
    """dk.set_validation for one test (what DPAR_VALIDATE does at import); the old state comes back after."""
    import dpar_kernels as dk

    previous = dk.validation_enabled()
    yield dk.set_validation
    dk.set_validation(previous)
