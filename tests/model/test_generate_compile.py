"""generate(compile=True): the per-token step as one torch.compile graph, with the same tokens as the eager loop, no
graph break, and no recompile across tokens or across calls of the same shapes; DPAR's global step (dynamic
shapes) in a few graphs, one per specialization dynamo makes (all images or some, one image, one-token patches).

Most tests trace with dynamo's eager backend, counting the graphs of each step (inductor's code generation takes
~30 s per graph on a loaded CPU); one test runs the real compile=True (inductor).
"""
import argparse
import collections
import functools

import pytest
import torch
import torch._dynamo
from model_utils import single_thread, tiny_models  # noqa: F401
from torch._dynamo.utils import counters

from dpar.model import generation
from dpar.pipeline import sample

GREEDY = pytest.param(1.0, dict(temperature=0.0), id="greedy")
CFG_TOP_K = pytest.param(3.0, dict(temperature=1.0, top_k=20), id="cfg-topk")
TOP_P = pytest.param(1.0, dict(temperature=0.9, top_p=0.8), id="topp")
CASES = [pytest.param("baseline", *p.values, id=f"baseline-{p.id}") for p in (GREEDY, CFG_TOP_K, TOP_P)] + \
    [pytest.param("dpar", *p.values, id=f"dpar-{p.id}") for p in (GREEDY, CFG_TOP_K)]


@pytest.fixture
def graphs(monkeypatch):
    """compile=True traces with dynamo's eager backend (fullgraph, as generation._compiled); returns a Counter of
    the graphs compiled per step function. Dynamo's caches and counters start empty."""
    compiled_graphs = collections.Counter()

    def compiled(step, mode, dynamic):
        def backend(graph_module, example_inputs):
            compiled_graphs[step.__name__] += 1
            return graph_module.forward
        return torch.compile(step, fullgraph=True, dynamic=dynamic, backend=backend)

    monkeypatch.setattr(generation, "_compiled", functools.cache(compiled))
    torch._dynamo.reset()
    counters.clear()
    yield compiled_graphs
    torch._dynamo.reset()


def _threshold_with_mixed_boundaries(config, entropy_model):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, config.tokens_per_image), generator=generator)
    return float(entropy_model.entropies(tokens).double().median())


def _sample(kind, models, labels, compile, cfg_scale=1.0, seed=5, **sampling):
    config, model, baseline, entropy_model = models
    knobs = dict(cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed), compile=compile, **sampling)
    if kind == "baseline":
        return baseline.generate(labels, **knobs), None
    threshold = _threshold_with_mixed_boundaries(config, entropy_model)
    return model.generate(labels, entropy_model=entropy_model, threshold=threshold, max_patch_size=3,
                          return_patches=True, **knobs)


STEP = {"baseline": "_baseline_step", "dpar": "_gathered_local_step"}  # float32 CPU: gathered


@pytest.mark.parametrize("kind,cfg_scale,sampling", CASES)
def test_compiled_step_gives_the_eager_tokens_in_one_graph(graphs, kind, cfg_scale, sampling):
    models = tiny_models(torch.float32, global_layers=1)
    labels = torch.tensor([0, 3, 7])
    tokens, patches = _sample(kind, models, labels, True, cfg_scale, **sampling)
    expected, expected_patches = _sample(kind, models, labels, False, cfg_scale, **sampling)
    assert torch.equal(tokens, expected)
    if kind == "dpar":
        assert torch.equal(patches.patch_lengths, expected_patches.patch_lengths)
        assert len(set(patches.patch_lengths.tolist())) > 1, "the patches should have several lengths"
        assert 1 <= graphs["_gathered_global_step"] <= 6, graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[STEP[kind]] == 1, f"the step recompiled across the {models[0].tokens_per_image} tokens: {graphs}"
    warm = graphs.copy()
    again, _ = _sample(kind, models, labels, True, cfg_scale, **sampling)
    assert torch.equal(again, tokens)
    assert graphs == warm, "a second call of the same shapes recompiled"
    other_seed, _ = _sample(kind, models, labels, True, cfg_scale, seed=6, **sampling)
    assert graphs[STEP[kind]] == 1
    assert not torch.equal(other_seed, tokens) or sampling["temperature"] == 0, "another seed, other tokens"


def test_dpar_fixed_patches_compile_without_the_entropy_model(graphs):
    """threshold +inf: no entropy cache, the compiled step never runs the entropy model."""
    config, model, _, entropy_model = tiny_models(torch.float32, seed=2)
    entropy_model.step = None  # calling it would fail
    labels = torch.tensor([1, 5])
    run = functools.partial(model.generate, labels, entropy_model=entropy_model, threshold=float("inf"),
                            max_patch_size=2, return_patches=True)
    (tokens, patches), (expected, _) = (run(generator=torch.Generator().manual_seed(0), compile=compile)
                                        for compile in (True, False))
    assert torch.equal(tokens, expected)
    assert patches.num_patches == 2 * config.tokens_per_image // 2
    assert graphs["_gathered_local_step"] == 1 and not counters["graph_break"], graphs


def test_compile_rejects_a_non_bool_non_mode():
    _, _, baseline, _ = tiny_models()
    with pytest.raises(TypeError, match="compile"):
        baseline.generate([1], compile=1)


@pytest.mark.slow
def test_compile_true_with_inductor_gives_the_eager_tokens():
    """The real compile=True (inductor, default mode) on a one-row grid, sampled with CFG: the same tokens. DPAR with
    fixed 2-token patches (one global-step graph: every image starts a patch at once). ~60-100 s on a loaded CPU."""
    config, model, baseline, entropy_model = tiny_models(torch.float32, grid_height=1, global_layers=1)
    labels = torch.tensor([2, 8])
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for compiled in (True, False):
        knobs = dict(cfg_scale=2.0, temperature=1.0, top_k=10, compile=compiled)
        tokens = baseline.generate(labels, generator=torch.Generator().manual_seed(1), **knobs)
        dpar_tokens, patches = model.generate(labels, entropy_model=entropy_model, threshold=float("inf"),
                                              max_patch_size=2, generator=torch.Generator().manual_seed(1),
                                              return_patches=True, **knobs)
        results[compiled] = tokens, dpar_tokens, patches.patch_lengths
    assert not counters["graph_break"], dict(counters["graph_break"])
    for got, expected in zip(results[True], results[False]):
        assert torch.equal(got, expected)
    assert patches.num_patches == 2 * config.tokens_per_image // 2


def test_sample_command_forwards_compile(graphs):
    """`dpar sample --compile` -> sample_tokens(compile=True) -> the compiled step, with the eager tokens."""
    parser = argparse.ArgumentParser()
    sample.add_arguments(parser)
    common = ["--ckpt", "model.pt", "--tokenizer", "palette.safetensors", "--out", "grid.png"]
    assert parser.parse_args([*common, "--compile"]).compile and not parser.parse_args(common).compile
    _, _, baseline, _ = tiny_models(torch.float32, grid_height=2)
    labels = torch.tensor([4, 6])
    tokens, _, _ = sample.sample_tokens(baseline, labels, temperature=1.0, seed=3, compile=True)
    assert graphs["_baseline_step"] == 1
    assert torch.equal(tokens, sample.sample_tokens(baseline, labels, temperature=1.0, seed=3)[0])
