"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 without register spills, and stays torch-free."""
import pathlib
import re
import shutil
import subprocess

import pytest
from helpers import ROOT as REPOSITORY

ROOT = pathlib.Path(REPOSITORY)
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
SPILL = re.compile(r"(\d+) bytes spill (?:stores|loads)")
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_without_spills(cu_file, arch, tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
           "-c", str(cu_file), "-o", str(tmp_path / f"{cu_file.stem}.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed for {cu_file.name} ({arch}):\n{log}"
    assert "ptxas info" in log, f"no ptxas report for {cu_file.name} ({arch}); is -Xptxas -v honoured?\n{log}"
    spills = [int(n) for n in SPILL.findall(log)]  # a store and a load figure per kernel (none in attention.cu)
    assert len(spills) == 2 * log.count("Compiling entry function"), log
    assert max(spills, default=0) == 0, f"{cu_file.name} ({arch}) spills registers:\n{log}"


@pytest.mark.parametrize("path", sorted((ROOT / "csrc" / "cuda").glob("*")), ids=lambda p: p.name)
def test_cuda_sources_do_not_include_torch(path):
    assert not TORCH_INCLUDE.search(path.read_text()), f"{path.name} includes a torch/ATen/c10 header"
