"""One compiled graph: torch.compile(model.loss, fullgraph=True, dynamic=True), forward and backward, with no
graph break and no recompile when the patch count P changes between batches.

The aot_eager backend traces exactly what inductor would get (dynamo graph + AOT autograd joint graph) without
inductor's code generation, which takes minutes on a loaded CPU; the `dpar train --compile` test runs inductor
on the tiny model.
"""
import math

import pytest
import torch
import torch._dynamo
from model_utils import random_batch, single_thread, tiny_models  # noqa: F401
from pipeline_helpers import train_args, write_random_dataset
from torch._dynamo.utils import counters

from dpar.pipeline import train
from dpar.pipeline.patchify import PatchTable


def _loss_and_grads(loss_fn, model, *batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["dpar", "baseline", "entropy"])
def test_loss_compiles_to_one_graph_across_patch_counts(kind):
    config, dpar_model, baseline, entropy_model = tiny_models(torch.float32, seed=2, global_layers=1)
    model = {"dpar": dpar_model, "baseline": baseline, "entropy": entropy_model}[kind]  # eval: no label dropout
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.loss, fullgraph=True, dynamic=True, backend="aot_eager")
    patch_counts = set()
    for seed in (0, 4, 5):  # P = 14, 16, 21 (and longest global sequences 8, 11, 12)
        tokens, labels, patches, _ = random_batch(config, images=2, seed=seed)
        patch_counts.add(patches.num_patches)
        batch = (tokens,) if kind == "entropy" else (tokens, labels, patches)
        loss, grads = _loss_and_grads(compiled, model, *batch)
        expected_loss, expected_grads = _loss_and_grads(model.loss, model, *batch)
        torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
        for grad, expected in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    assert len(patch_counts) == 3, patch_counts
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_train_compile_runs_one_graph_across_batches(tmp_path):
    """`dpar train --compile` (inductor): three steps with different patch counts, one graph, no break."""
    write_random_dataset(tmp_path / "data", count=16)
    PatchTable.from_entropies(torch.rand(16, 16) * 3, 1.5, 4, 4).save(str(tmp_path / "patches.pt"))
    torch._dynamo.reset()
    counters.clear()
    records = train.train(train_args(["dpar", "--data", tmp_path / "data", "--out", tmp_path / "out", "--steps", 3,
                                      "--batch-size", 4, "--compile", "--patches", tmp_path / "patches.pt"]))
    assert len({r["global_tokens"] for r in records}) > 1
    assert all(math.isfinite(r["loss"]) for r in records)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.slow
def test_train_compile_baseline_with_inductor(tmp_path):
    """`dpar train baseline --compile` (inductor) trains: the baseline's class-token position once hit an inductor
    lowering failure ("vr must not be None") on 8x8 grids."""
    write_random_dataset(tmp_path / "data", count=8, grid=8)
    torch._dynamo.reset()
    counters.clear()
    records = train.train(train_args(["baseline", "--data", tmp_path / "data", "--out", tmp_path / "out", "--steps", 2,
                                      "--batch-size", 4, "--compile"]))
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert not counters["graph_break"], dict(counters["graph_break"])
