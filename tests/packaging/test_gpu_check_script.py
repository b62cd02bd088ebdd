"""scripts/gpu_check.sh --dry-run: the GPU check's steps on CPU (Triton interpreter, tiny shapes), so the script
that a lent GPU runs in one call cannot rot. Nothing here is verified on a GPU."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_dry_run_writes_the_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path), "--dry-run"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert summary["dry_run"] and summary["ok"]
    gpu_only = ("build", "extension", "pytest-cuda", "memcheck", "racecheck", "synccheck")
    assert all(status[name].startswith("skipped") for name in gpu_only), status
    assert status["pytest-triton"] == status["sanitizer-driver"] == status["benchmarks"] == "ok"
    pytest_log = (tmp_path / "pytest_triton.log").read_text()
    assert " passed" in pytest_log and "failed" not in pytest_log
    assert "calls done" in (tmp_path / "sanitizer.log").read_text()
    rows = summary["benchmarks"]["rows"]
    assert {r["group"] for r in rows} == {"attention", "memory", "decode"}
    assert any(r["impl"] == "dk-triton" and "fwd+bwd TFLOP/s" in r for r in rows)
    assert any(r["impl"] == "dk-triton" and r["case"].startswith("large") and "fwd TFLOP/s" in r for r in rows)
    assert any(r["impl"] == "device-copy" and "GB/s" in r for r in rows)
    assert {r["case"] for r in rows if r["group"] == "decode" and r["impl"] == "dk-triton" and "GB/s" in r} == \
        {r["case"] for r in rows if r["group"] == "decode"}, "every decode case has a dk-triton figure"
    assert any("large" in r["case"] for r in rows if r["group"] == "memory")
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| pytest-triton | ok |" in table and "dry run on CPU" in table
