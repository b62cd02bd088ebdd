"""Packaging: the sdist carries what the build needs, a failed build fails loudly, a foreign _C is not loaded.

The full wheel-from-sdist compile (minutes) runs once in scripts/test.sh; these tests do not compile.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import metadata

import pytest
import tomllib
import torch
from helpers import ROOT

import dpar_kernels as dk

FAKE_COMPILER = """#!/bin/sh
if [ "$1" = "--version" ]; then exec g++ --version; fi
echo "fakecxx: error: this compiler refuses to compile" >&2
exit 1
"""


def _run(cmd, timeout=600, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("sdist")
    result = _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), ROOT])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (path,) = glob.glob(str(out / "*.tar.gz"))
    return path


def test_sdist_carries_every_build_input(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc", "dpar_kernels", "dpar"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    needed = [p for p in tracked if p.startswith("csrc/") or p.endswith(".py")]
    assert any(p.endswith(".cu") for p in needed) and any(p.endswith(".h") for p in needed)
    missing = [p for p in needed + ["setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md"]
               if p not in names]
    assert not missing, f"sdist lacks {missing}"
    assert not [n for n in names if n.endswith((".so", ".o")) or n.endswith("_C.build.json")]


def test_metadata_has_one_version_and_a_license():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert dk.__version__ == project["version"] == metadata("dpar-kernels")["Version"]
    assert project["license"] == "Apache-2.0" and os.path.exists(os.path.join(ROOT, "LICENSE"))
    assert {"fid", "bench"} <= set(project["optional-dependencies"])
    assert any(dep.startswith("torch>=2.13") for dep in project["dependencies"])
    version = _run([sys.executable, "-m", "dpar", "--version"], timeout=120)
    assert version.stdout.strip() == f"dpar-kernels {project['version']}"


def _wheel(sdist, out, **env):
    return _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(out), sdist],
                **env)


def test_failed_build_fails_the_install_with_the_compiler_error(sdist, tmp_path):
    compiler = tmp_path / "fakecxx"
    compiler.write_text(FAKE_COMPILER)
    compiler.chmod(0o755)
    result = _wheel(sdist, tmp_path / "wheel", CC=str(compiler), CXX=str(compiler), MAX_JOBS="1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "fakecxx: error: this compiler refuses to compile" in output and "DPAR_NO_EXTENSION=1" in output
    assert not glob.glob(str(tmp_path / "wheel" / "*.whl"))


def test_no_extension_install_is_pure_python(sdist, tmp_path):
    result = _wheel(sdist, tmp_path, DPAR_NO_EXTENSION="1", CC="/bin/false", CXX="/bin/false")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "dpar_kernels/flash_attn_compat.py" in names and not [n for n in names if "_C" in n.split("/")[-1]]


def _import_extension(package_dir, build_torch):
    """Imports a copy of dpar_kernels whose _C.build.json names ``build_torch``; -> (HAS_CPU_OPS, stderr)."""
    shutil.copytree(os.path.join(ROOT, "dpar_kernels"), package_dir / "dpar_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.build.json"))
    (package_dir / "dpar_kernels" / "_C.build.json").write_text(json.dumps({"torch": build_torch}))
    result = subprocess.run([sys.executable, "-W", "always", "-c",
                             "import dpar_kernels._extension as e; print(e.HAS_CPU_OPS)"],
                            cwd=package_dir, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(package_dir)})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True", result.stderr


def test_extension_built_against_another_torch_is_not_loaded(tmp_path):
    loaded, stderr = _import_extension(tmp_path, "2.0.0")
    assert not loaded
    assert f"built against torch 2.0.0 but torch {torch.__version__} is running" in stderr
    assert "--no-build-isolation" in stderr


@pytest.mark.skipif(not glob.glob(os.path.join(ROOT, "dpar_kernels", "_C*.so")), reason="no built _C here")
def test_extension_built_against_this_torch_loads(tmp_path):
    loaded, stderr = _import_extension(tmp_path, torch.__version__)
    assert loaded and "dpar_kernels._C is not used" not in stderr


def test_benchmarks_refuse_to_run_without_the_extension(tmp_path):
    """A copy of the tree whose _C names a foreign torch: _C stays unloaded, as in a tree without a build."""
    for folder in ("benchmarks", "dpar", "dpar_kernels"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_C.build.json"))
    (tmp_path / "dpar_kernels" / "_C.build.json").write_text(json.dumps({"torch": "2.0.0"}))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    command = [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"]
    refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "DPAR_ALLOW_NO_EXTENSION=1" in refused.stdout + refused.stderr
    allowed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "DPAR_ALLOW_NO_EXTENSION": "1"})
    assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-2000:]


MACHINE = {"cpu_model": "Test CPU (family 1, model 2)", "isa": "avx2", "cores": 2, "threads": 2, "gpu": "",
           "python": "3.11.7", "torch": "2.13.0", "triton": "", "commit": "abc1234"}


def test_benchmark_report_writes_results_as_data_and_a_summary(tmp_path, monkeypatch):
    import csv

    from benchmarks import report
    rows = [("attention", "padded sdpa", 0.02, True, None), ("attention", "dpar cpu", 0.001, False, 4e7)]
    data = {"benchmarks": [{"name": impl, "group": group, "stats": {"mean": mean, "stddev": 0.0, "rounds": 3},
                            "extra_info": {"impl": impl, "shape": "4 sequences", "baseline": base,
                                           **({"flops": flops} if flops else {})}}
                           for group, impl, mean, base, flops in rows],
            "dpar": {"mode": "quick", "command": "DPAR_BENCH_QUICK=1 pytest benchmarks", "machine": MACHINE,
                     "loadavg_start": [3.5, 2.0, 1.0], "loadavg_end": [4.0, 2.5, 1.5], "cpu_count": 2}}
    (tmp_path / "b.json").write_text(json.dumps(data))
    results = tmp_path / "results"
    results.mkdir()
    (results / "test-cpu-avx2-quick.md").write_text("Rows of a test run.\n")  # a file's note goes under its heading
    monkeypatch.setattr(report, "RESULTS_DIR", str(results))
    monkeypatch.setattr(report, "SUMMARY", str(tmp_path / "RESULTS.md"))
    report.main(["--json", str(tmp_path / "b.json"), "--out", str(tmp_path), "--save"])
    text = (tmp_path / "report.md").read_text()
    assert "Test CPU (family 1, model 2), ISA path avx2, 2 cores, torch threads 2" in text
    assert "commit `abc1234`, quick mode" in text and "`DPAR_BENCH_QUICK=1 pytest benchmarks`" in text
    assert "3.50/2.00/1.00 at the start" in text
    assert "| attention | 4 sequences | dpar cpu | 1 ms | padded sdpa 20 ms | **20.00x** |" in text
    assert "| padded sdpa |" not in text, "timed baselines appear as the baseline of their group only"
    with open(tmp_path / "results.csv") as f:
        table = {r["implementation"]: r for r in csv.DictReader(f)}
    assert table["dpar cpu"]["speedup"] == "20" and table["dpar cpu"]["gflops_per_s"] == "40"
    assert table["padded sdpa"]["gflops_per_s"] == "2", "a baseline row takes its group's workload FLOPs"
    assert {table["dpar cpu"][k] for k in ("isa", "commit", "mode", "shape")} == {"avx2", "abc1234", "quick",
                                                                               "4 sequences"}
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 2
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    saved = results / "test-cpu-avx2-quick.csv"
    assert saved.read_text() == (tmp_path / "results.csv").read_text()
    summary = (tmp_path / "RESULTS.md").read_text()
    assert "## [test-cpu-avx2-quick.csv](results/test-cpu-avx2-quick.csv)\n\nRows of a test run.\n" in summary
    assert "**20.00x**" in summary and "gpu_check.sh" in summary


def test_machine_reads_cpu_model_and_isa_from_cpuinfo():
    from benchmarks import machine
    cpuinfo = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fma avx2 sse\n"
    assert machine.cpu_model(cpuinfo) == "AMD EPYC 7B13 (family 25, model 1)"
    assert machine.isa_from_flags({"fma", "avx2"}) == "avx2"
    assert machine.isa_from_flags({"fma", "avx2", "avx512f"}) == "avx512"
    assert machine.isa_from_flags({"avx2"}) == "default" and machine.isa_from_flags(set()) == "default"
    info = machine.machine_info()
    assert set(info) == set(MACHINE) and info["cores"] >= 1 and info["isa"] in ("avx512", "avx2", "default")


def test_gpu_bench_rows_become_report_rows():
    from benchmarks import gpu_bench, report
    rows = gpu_bench.with_ratios([{"group": "memory", "case": "gather", "impl": "device-copy", "GB/s": 100.0},
                                  {"group": "memory", "case": "gather", "impl": "dk-cuda", "GB/s": 50.0},
                                  {"group": "memory", "case": "gather", "impl": "dk-triton", "error": "boom"}])
    out = gpu_bench.result_rows(rows, {**MACHINE, "gpu": "H200", "mode": "gpu bfloat16"}, "32 images")
    assert [r["implementation"] for r in out] == ["device-copy", "dk-cuda"], "a failed row has no figure"
    dk_row = out[1]
    assert set(dk_row) == set(report.FIELDS) and dk_row["backend"] == "cuda" and dk_row["gpu"] == "H200"
    assert (dk_row["value"], dk_row["unit"], dk_row["speedup"], dk_row["fastest_baseline"]) == (
        50.0, "GB/s", 0.5, "device-copy")
