"""`dpar demo`: the quick run end to end (report fields, files, progress), the paired summary, the progress bars."""
import io
import json
import subprocess
import sys

import pytest
from helpers import ROOT

from dpar.pipeline import demo, progress


def test_demo_quick_reports_every_field(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dpar", "demo", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert report in result.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["runs"]) == 6
    assert set(summary["arms"]) == {"baseline", "dpar-entropy", "dpar-static"}
    for name, arm in summary["arms"].items():
        assert set(arm) >= {"train_seconds", "time_ratio", "flop_ratio", "step_time_ratio", "step_flop_ratio",
                            "start_nll", "final_nll", "final_nll_interval"}, name
        assert arm["train_seconds"] > 0 and arm["flop_ratio"] >= 1.0 - 1e-9  # every run reaches the budget
        stats = arm["final_nll_interval"]
        assert stats["n"] == 2 and stats["low"] <= stats["mean"] <= stats["high"]
        assert arm["label"] in report
    assert summary["arms"]["baseline"]["time_ratio"] == pytest.approx(1.0)
    assert set(summary["differences"]) == {"dpar-entropy - baseline", "dpar-static - baseline",
                                           "dpar-entropy - dpar-static"}
    for diff in summary["differences"].values():
        assert diff["sentence"] in report
    assert list(summary["phases"]) == ["data", "calibration", "entropy model", "patches", "train baseline",
                                       "train dpar-entropy", "train dpar-static", "samples and plots"]
    assert sum(summary["phases"].values()) <= summary["seconds"]
    assert summary["estimate"]["total"] > 0 and "estimated run time on this machine" in result.stdout
    machine = summary["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["torch_threads"] >= 1
    assert machine["isa"] in ("avx512", "avx2", "default", "none")
    assert f"ISA path {machine['isa']}" in report and "| LlamaGen baseline | 16.00 | 1.000x |" in report
    for label in ("entropy model", "baseline/seed1 (every token)", "dpar-static/seed1 (static)"):
        assert f"  {label}: 100%" in result.stderr, f"{label} shows a finished progress bar"
    for name in ("samples_dpar.png", "samples_baseline.png", "patch_map.png", "nll_vs_flops.png",
                 "tokenizer.safetensors", "runs/dpar-entropy/seed0/patches.pt",
                 "runs/dpar-static/seed1/checkpoint.safetensors", "runs/baseline/seed0/log.jsonl"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 100, name
    assert (tmp_path / "nll_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def _run(name: str, seed: int, seconds: float, steps: int, flops: float, final: float) -> dict:
    return {"name": f"{name}/seed{seed}", "seed": seed, "patching": name, "heldout_global_tokens_per_image": 16.0,
            "steps": steps, "flops_per_step": flops / steps, "train_flops": flops, "train_seconds": seconds,
            "median_step_seconds": seconds / steps,
            "start_nll": 5.0, "final_nll": final}


def test_summarise_pairs_each_arm_with_the_baseline_of_its_seed():
    runs = [_run("baseline", 0, 10.0, 100, 1e12, 2.0), _run("baseline", 1, 20.0, 100, 1e12, 2.2),
            _run("dpar-entropy", 0, 5.0, 125, 1.01e12, 1.8), _run("dpar-entropy", 1, 30.0, 125, 1.01e12, 1.9),
            _run("dpar-static", 0, 10.0, 125, 1e12, 1.9), _run("dpar-static", 1, 20.0, 125, 1e12, 2.1)]
    arms, differences = demo.summarise(runs, [0, 1])
    entropy = arms["dpar-entropy"]
    assert entropy["time_ratio"] == pytest.approx((0.5 + 1.5) / 2)  # paired per seed, then averaged
    assert entropy["train_seconds"] == pytest.approx(17.5)
    assert entropy["flop_ratio"] == pytest.approx(1.01)
    assert entropy["step_time_ratio"] == pytest.approx((0.5 * 100 / 125 + 1.5 * 100 / 125) / 2)
    assert entropy["step_flop_ratio"] == pytest.approx(1.01 * 100 / 125)
    assert entropy["final_nll_interval"]["mean"] == pytest.approx(1.85)
    diff = differences["dpar-entropy - baseline"]
    assert diff["values"] == pytest.approx([-0.2, -0.3]) and diff["mean"] == pytest.approx(-0.25)
    assert diff["sentence"].startswith("'DPAR with entropy patches beats the baseline")
    one_seed, no_differences = demo.summarise([r for r in runs if r["seed"] == 0], [0])
    assert "final_nll_interval" not in one_seed["baseline"] and no_differences == {}


def test_line_bar_writes_one_line_per_refresh_with_elapsed_and_remaining_time():
    stream = io.StringIO()  # not a terminal: lines, not carriage returns
    with progress.bar(4, "phase", stream=stream, mininterval=0) as bar:
        for _ in range(4):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) >= 2
    assert lines[-1].startswith("phase: 100%") and "4/4 [" in lines[-1] and "<00:00" in lines[-1]


def test_demo_rejects_bad_threads_and_seeds(tmp_path):
    for flag, value in (("--threads", "0"), ("--seeds", "0")):
        result = subprocess.run([sys.executable, "-m", "dpar", "demo", "--quick", "--out", str(tmp_path), flag, value],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and flag in result.stderr and "Traceback" not in result.stderr
