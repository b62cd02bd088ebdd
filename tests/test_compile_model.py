"""One compiled graph: torch.compile(model.loss, fullgraph=True, dynamic=True), forward and backward, with no
graph break and no recompile when the patch count P changes between batches.

The aot_eager backend traces exactly what inductor would get (dynamo graph + AOT autograd joint graph) without
inductor's code generation, which takes minutes on a loaded CPU; `dpar train --compile` uses inductor.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from model_utils import random_batch, single_thread, tiny_models  # noqa: F401


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
