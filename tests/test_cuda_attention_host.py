"""Host-side checks of the CUDA attention kernels' index math and shared-memory plans (no GPU needed).

csrc/cuda/attention_tiles.h holds everything the kernels compute about which (query, key) tiles to visit and where
each tile lives in shared memory. tests/cuda_host/attention_tiles_check.cpp compares it against a brute-force
definition of bottom-right causal masking; this test builds that program with nvcc (as CUDA, so the
__host__ __device__ path is the one compiled) or, without nvcc, with a host C++ compiler, and runs it.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cuda_host", "attention_tiles_check.cpp")
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
