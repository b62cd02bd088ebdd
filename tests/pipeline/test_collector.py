"""The training loops' manual garbage collection (dpar.pipeline.collector) and the premise it rests on."""
import gc
import weakref

import pytest
import torch
from model_utils import random_batch, tiny_models

from dpar.pipeline import collector, train


@pytest.mark.parametrize("kind", ["dpar", "baseline", "entropy"])
def test_a_training_step_makes_no_reference_cycles(kind):
    """With the automatic collector off, a full collection after optimizer steps finds nothing: turning it off
    inside the training loops frees no less memory."""
    config, dpar_model, baseline, entropy = tiny_models(torch.float32)
    model = {"dpar": dpar_model, "baseline": baseline, "entropy": entropy}[kind].train()
    tokens, labels, patches, _ = random_batch(config, images=3)
    optimizer = train.make_optimizer(model, 1e-3, (0.9, 0.95), 0.05)

    def step():
        loss = model.loss(tokens) if kind == "entropy" else model.loss(tokens, labels, patches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()  # optimizer state created outside the measured steps
    gc.collect()
    with collector.manual_collection():
        for _ in range(3):
            step()
        assert gc.collect() == 0


def test_manual_collection_restores_the_collector_and_respects_a_callers_freeze():
    assert gc.isenabled()
    with collector.manual_collection():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own frozen objects stay frozen
    try:
        frozen = gc.get_freeze_count()
        with collector.manual_collection():
            assert not gc.isenabled()
        assert gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
    gc.disable()  # a caller that had it off keeps it off
    try:
        with collector.manual_collection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collect_if_due_frees_cycles_every_collect_every_steps():
    class Node:
        pass

    with collector.manual_collection():
        node = Node()
        node.self = node
        alive = weakref.ref(node)
        del node
        collector.collect_if_due(collector.COLLECT_EVERY - 1)
        assert alive() is not None  # not due: the cycle is still there
        collector.collect_if_due(collector.COLLECT_EVERY)
        assert alive() is None
