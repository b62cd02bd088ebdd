import subprocess
import sys

import pytest
from helpers import ROOT

COMMANDS = ["train", "patchify", "sample", "evaluate", "demo", "ablate", "extract-codes"]


def _run(args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = _run(["-m", "dpar", command, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: python -m dpar " + command in result.stdout and "--" in result.stdout


def test_top_level_help_and_docstring_list_every_command():
    import dpar.__main__ as cli

    result = _run(["-m", "dpar", "--help"])
    assert result.returncode == 0 and all(c in result.stdout for c in COMMANDS)
    assert sorted(cli.COMMANDS) == sorted(COMMANDS)
    assert all(c in cli.__doc__.split("\n")[0] for c in COMMANDS), cli.__doc__


def test_demo_quick_writes_report_and_pngs(tmp_path):
    result = _run(["-m", "dpar", "demo", "--quick", "--out", str(tmp_path)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "| LlamaGen baseline | 16.00 | 1.000x |" in report
    assert "| DPAR, entropy patches |" in report and "| DPAR, static patches |" in report
    assert "same budget" in report and report in result.stdout
    for run in ("baseline", "dpar-entropy", "dpar-static"):
        assert f"[{run}] step" in result.stdout, "every training run prints its progress"
    for name in ("samples_dpar.png", "samples_baseline.png", "patch_map.png", "nll_vs_flops.png",
                 "tokenizer.safetensors", "runs/dpar-entropy/patches.pt", "runs/dpar-static/checkpoint.safetensors",
                 "runs/baseline/log.jsonl"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 100, name
    assert (tmp_path / "samples_dpar.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "nll_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
