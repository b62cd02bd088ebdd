import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Triton picks the interpreter when a kernel is defined, so it must be on before dpar_kernels' Triton modules load.
# With it on, backend="triton" runs on CPU tensors; backend=None still never picks triton for CPU tensors.
# On a machine with a GPU the Triton kernels compile for real (TRITON_INTERPRET=1 set by hand forces the interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend=None runs the C++ kernels on CPU tensors in the tests and in every process they start, whatever this
# machine's measured choice (dpar_kernels/cpu_choice.json) says; tests/ops/test_cpu_choice.py tests the choice itself.
os.environ["DPAR_CPU_CHOICE"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                             "cpu_choice_all_cpu.json")


# Two tiers: the default fast tier (`pytest`, a few minutes) leaves out what builds, compiles or trains: these
# folders and files (paths under tests/) and tests marked `slow`; the full tier (`pytest --tier full`, what CI runs
# through scripts/test.sh) runs everything.
FULL_TIER_ONLY = ("csrc/", "packaging/", "pipeline/", "model/test_compile_model.py", "model/test_generate_compile.py",
                  "ops/test_attention_triton.py", "ops/test_faults.py")  # the gpu-marked tests skip fast without CUDA
TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("fast", "full"), default="fast",
                     help="fast (default): leave out the building, compiling and training tests; full: all (CI)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--tier") == "full":
        return
    kept, left_out = [], []
    for item in items:
        path = os.path.relpath(str(item.path), TESTS).replace(os.sep, "/")
        full_only = "slow" in item.keywords or path.startswith(FULL_TIER_ONLY)
        (left_out if full_only else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture
def cpu_choice():
    """_cpu_choice.set_table for one test; the tests' all-cpu table comes back after."""
    from dpar_kernels import _cpu_choice

    previous = _cpu_choice.table()
    yield _cpu_choice.set_table
    _cpu_choice.set_table(previous)


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
