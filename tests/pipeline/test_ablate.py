"""`dpar ablate` on a tiny configuration: the JSON schema, equal FLOP budgets, monotone curves, the PNGs."""
import json

import pytest
import torch

from dpar.pipeline import ablate

TINY = dict(train_images=32, val_images=16, image_size=8, grid=4, colors=16, steps=8, entropy_steps=2,
            batch_size=8, lr=1e-3, points=5, choices=False)
RUN_KEYS = {"name", "patching", "global_tokens_per_image", "train_flops", "curve", "final_nll", "seconds",
            "flop_budget", "steps"}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out, threads = tmp_path_factory.mktemp("ablate"), torch.get_num_threads()
    torch.set_num_threads(1)  # as `dpar ablate` runs by default
    try:
        ablate.run_ablation(str(out), dict(TINY), seed=0)
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "ablation.json").read_text())


def test_schema_and_runs(ablation):
    _, result = ablation
    names = [run["name"] for run in result["runs"]]
    assert names == ["baseline", "dpar-entropy", "dpar-static", "dpar-one-token"]
    for run in result["runs"]:
        assert RUN_KEYS <= set(run), run.keys()
        assert len(run["curve"]) >= 5 and run["final_nll"] == run["curve"][-1][1] and run["seconds"] > 0
    tokens = {run["name"]: run["global_tokens_per_image"] for run in result["runs"]}
    assert tokens["baseline"] == tokens["dpar-one-token"] == 16
    assert tokens["dpar-entropy"] < 16 and abs(tokens["dpar-static"] - tokens["dpar-entropy"]) <= 0.5
    assert {"16x16", "4x4"} & set(result["resolution_reduction"]) == {"4x4"}
    rows = result["patch_size_tolerance"]
    assert {(row["max_patch_size"], row["threshold_raise"]) for row in rows} == {
        (s, t) for s in (4, 6, 8) for t in ablate.EVAL_THRESHOLD_RAISES}
    steps = {(row["max_patch_size"], row["threshold_raise"]): row["global_steps_per_image"] for row in rows}
    assert steps[8, 2 / 3] <= steps[4, 2 / 3] <= steps[4, 0.0]  # bigger patches, fewer global steps
    shares = result["patch_size_histogram"]["entropy"]
    assert abs(sum(shares.values()) - 1) < 1e-9 and max(int(n) for n in shares) <= 4


def test_every_run_stops_within_one_step_of_the_same_budget(ablation):
    out, result = ablation
    budget = result["flop_budget"]
    for run in result["runs"]:
        log = [json.loads(line) for line in (out / "runs" / run["name"] / "log.jsonl").read_text().splitlines()]
        assert run["flop_budget"] == budget and run["train_flops"] == log[-1]["cum_flops"] >= budget
        assert log[-1]["cum_flops"] - log[-1]["flops"] < budget, "the run went on past the budget"


def test_curves_are_monotone_and_pngs_are_written(ablation):
    out, result = ablation
    for run in result["runs"]:
        flops = [point[0] for point in run["curve"]]
        assert flops == sorted(flops) and len(set(flops)) == len(flops) and flops[-1] == run["train_flops"]
    for name in ("nll_vs_flops.png", "patch_sizes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| dpar-static |" in (out / "report.md").read_text()
