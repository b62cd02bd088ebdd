"""`dpar ablate` on a tiny configuration: the JSON fields, equal FLOP budgets, paired seeds and their intervals,
the arms' patch tables and FLOP accounting; and the interval arithmetic it relies on."""
import argparse
import dataclasses
import json
import math

import pytest
import torch

from dpar.model.config import ModelConfig, get_config
from dpar.model.flops import baseline_training_flops
from dpar.model.patcher import PatchBatch
from dpar.pipeline import ablate, data, intervals, objectives, patchify
from dpar.pipeline.builders import build_model, make_config

TINY = dict(ablate.QUICK, train_images=64, val_images=16, image_size=8, grid=4, colors=16,
            overrides=("global_layers=2",), budget_steps=4, batch_size=8, seeds=2, entropy_steps=8,
            entropy_batch_size=8, bins=2)
RUN_KEYS = {"arm", "seed", "steps", "train_flops", "last_step_flops", "flops_per_step", "final_nll",
            "equal_steps_nll", "bin_nll", "heldout_global_tokens_per_image", "seconds"}
INTERVAL_KEYS = {"mean", "low", "high", "half_width", "n", "values"}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out, threads = tmp_path_factory.mktemp("ablate"), torch.get_num_threads()
    torch.set_num_threads(1)  # as `dpar ablate` runs by default
    try:
        ablate.run_ablation(str(out), dict(TINY))
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "ablation.json").read_text())


def test_every_arm_runs_on_every_seed_with_its_fields(ablation):
    out, result = ablation
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [(a, s) for s in (0, 1) for a in ablate.ARMS]
    for run in result["runs"]:
        assert RUN_KEYS <= set(run) and len(run["bin_nll"]) == TINY["bins"] and run["seconds"] > 0
        assert all(math.isfinite(v) for v in (run["final_nll"], run["equal_steps_nll"], *run["bin_nll"]))
    assert result["seeds_complete"] == [0, 1] and set(result["arms"]) == set(ablate.ARMS)
    for stats in result["arms"].values():
        for entry in (stats["final_nll"], stats["equal_steps_nll"], *stats["bin_nll"]):
            assert INTERVAL_KEYS <= set(entry) and entry["low"] <= entry["mean"] <= entry["high"] and entry["n"] == 2
    assert result["data"]["heldout_crops_overlapping_training"] == 0
    assert result["data"]["train_crops"] == 64 and len(result["data"]["photos"]) >= 15
    for name in ("nll_by_arm.png", "patch_sizes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_paired_differences_come_from_the_same_seeds(ablation):
    _, result = ablation
    final = {(r["arm"], r["seed"]): r["final_nll"] for r in result["runs"]}
    assert set(result["differences"]) == {f"{a} - {b}" for a, b, _ in ablate.CLAIMS}
    for first, second, claim in ablate.CLAIMS:
        diff = result["differences"][f"{first} - {second}"]
        assert diff["values"] == pytest.approx([final[first, s] - final[second, s] for s in (0, 1)])
        assert diff["excludes_zero"] == (diff["low"] > 0 or diff["high"] < 0)
        assert diff["claim"] == claim and claim in diff["sentence"] and len(diff["bins"]) == TINY["bins"]
        assert ("excludes zero" in diff["sentence"]) == diff["excludes_zero"]
    report = (ablation[0] / "report.md").read_text()
    assert all(diff["sentence"] in report for diff in result["differences"].values())
    assert "| dpar-shuffled |" in report and "share a pixel with a training crop" in report


def test_every_run_stops_at_the_first_step_past_the_same_budget(ablation):
    _, result = ablation
    budget = result["flop_budget"]
    for run in result["runs"]:
        assert run["train_flops"] >= budget > run["train_flops"] - run["last_step_flops"], run["arm"]
    steps = {r["arm"]: r["steps"] for r in result["runs"] if r["seed"] == 0}
    assert steps["baseline"] == TINY["budget_steps"] == result["equal_steps"]
    assert steps["dpar-entropy"] > steps["baseline"] and steps["shallow-baseline"] > steps["baseline"]


def test_flop_accounting_honours_overrides_and_reports_the_entropy_model(ablation):
    out, result = ablation
    dataset = data.TokenGridDataset(str(out / "data" / "train"))
    config = ModelConfig(**make_config("baseline", TINY["size"], dataset, list(TINY["overrides"])))
    assert config.global_layers == 2
    per_step = baseline_training_flops(config, TINY["batch_size"])["total"]
    assert result["flop_budget"] == TINY["budget_steps"] * per_step
    models = result["models"]
    assert models["baseline"]["layers"] == models["dpar-entropy"]["layers"] == [1, 2, 1]
    assert 0 < models["dpar-entropy"]["global_share_of_flops"] < 1
    per_step = {a: result["arms"][a]["flops_per_step"][0] for a in ablate.ARMS}
    depth = sum(models["shallow-baseline"]["layers"])

    def baseline_of_depth(d: int) -> float:
        return baseline_training_flops(dataclasses.replace(config, encoder_layers=0, global_layers=d,
                                                           decoder_layers=0), TINY["batch_size"])["total"]

    assert depth < 4 and per_step["shallow-baseline"] == baseline_of_depth(depth)
    layer = baseline_of_depth(2) - baseline_of_depth(1)  # the closest depth to DPAR's FLOPs per step
    gaps = [abs(baseline_of_depth(d) - per_step["dpar-entropy"]) for d in range(1, 4)]
    assert gaps[depth - 1] <= min(gaps) + layer / 2
    entropy = result["entropy_model"]
    assert entropy["steps"] == TINY["entropy_steps"] and entropy["train_flops"] > 0
    assert entropy["inference_images"] == 64 + 16 and entropy["inference_flops"] > 0
    assert [step for step, _ in entropy["heldout_loss_curve"]] == [2, 4, 6, 8]


def test_shuffled_patches_keep_each_rows_lengths_but_not_their_order():
    torch.manual_seed(0)
    entropies = torch.rand(12, 64) * 3
    table = patchify.PatchTable.from_entropies(entropies, 1.5, 4, 8)
    shuffled = ablate.shuffled_table(table, seed=3)
    assert torch.equal(shuffled.cu_patches, table.cu_patches) and not torch.equal(shuffled.patch_lengths,
                                                                                table.patch_lengths)

    def rows(lengths):
        out, row, filled = [], [], 0
        for n in lengths.tolist():
            row.append(n)
            filled += n
            if filled % 8 == 0:
                out.append(row)
                row = []
        assert not row, "a patch crossed a row"
        return out

    original, permuted = rows(table.patch_lengths), rows(shuffled.patch_lengths)
    assert len(original) == len(permuted) == 12 * 8
    assert all(sorted(a) == sorted(b) for a, b in zip(original, permuted))
    assert torch.equal(ablate.shuffled_table(table, seed=3).patch_lengths, shuffled.patch_lengths)


def test_warmup_cosine_schedule():
    values = [ablate.warmup_cosine(s, 100, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[99] == pytest.approx(ablate.MIN_LR_SHARE)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_entropy_bins_are_equally_populated():
    entropies = torch.arange(4 * 9, dtype=torch.float32).reshape(4, 9)
    edges, bins = ablate.entropy_bins(entropies, 4)
    assert bins.shape == (4, 8) and torch.bincount(bins.reshape(-1)).tolist() == [8, 8, 8, 8]
    assert edges[0] == 0 and edges[-1] == 34


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (30, 2.0423)])
def test_t_quantiles_match_the_tables(df, quantile):
    assert intervals.t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    assert intervals.t_cdf(0.0, df) == pytest.approx(0.5)


def test_intervals_and_paired_differences():
    stats = intervals.mean_interval([1.0, 2.0, 3.0])
    assert stats["mean"] == 2 and stats["half_width"] == pytest.approx(4.3027 * 1 / math.sqrt(3), abs=1e-4)
    diff = intervals.paired_difference([1.0, 2.0, 3.0], [1.5, 2.4, 3.6])  # consistently lower: -0.5 +- 0.1
    assert diff["excludes_zero"] and diff["sign"] == "lower" and diff["mean"] == pytest.approx(-0.5)
    unresolved = intervals.paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])
    assert not unresolved["excludes_zero"] and unresolved["sign"] == "unresolved"
    with pytest.raises(ValueError, match="at least two"):
        intervals.mean_interval([1.0])
    with pytest.raises(ValueError, match="equal lengths"):
        intervals.paired_difference([1.0, 2.0], [1.0])


def test_cli_refuses_a_single_seed():
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    with pytest.raises(ValueError, match="--seeds must be at least 2"):
        ablate.main(parser.parse_args(["--out", "unused", "--seeds", "1"]))


@pytest.mark.parametrize("kind", ["baseline", "dpar"])
def test_token_nll_is_the_models_loss_token_by_token(kind):
    torch.manual_seed(0)
    config = get_config("tiny", vocab_size=16, num_classes=3, grid_height=4, grid_width=4, num_heads=2,
                        num_kv_heads=2)
    model = build_model(kind, dataclasses.asdict(config)).eval()
    tokens = ablate.TokenSet(torch.randint(0, 16, (10, 16)), torch.randint(0, 3, (10,)), 4)
    table = None if kind == "baseline" else patchify.PatchTable.from_entropies(torch.rand(10, 16), 0.5, 4, 4)
    nll = ablate.token_nll(kind, model, tokens, table, batch_size=4)
    assert nll.shape == (10, 16) and bool((nll > 0).all())
    patches = None if table is None else PatchBatch.from_lengths(*table.batch(torch.arange(10)), 4)
    with torch.no_grad():
        loss = objectives.LossModule(model, 4)(tokens.tokens, tokens.labels, patches)
    assert float(nll.mean()) == pytest.approx(float(loss), rel=1e-5)
