import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from pipeline_helpers import train_args, write_random_dataset

import dpar_kernels as dk
from dpar.pipeline import checkpoint, train
from dpar.pipeline.patchify import PatchTable, threshold_for_reduction

NO_CLASS_DROPOUT = ["class_dropout=0"]


class Killed(Exception):
    pass


def _log(out):
    with open(os.path.join(out, train.LOG)) as f:
        return [json.loads(line) for line in f]


def _weights(out):
    return checkpoint.read_checkpoint(os.path.join(out, train.CHECKPOINT))[1]


@pytest.mark.parametrize("kind", ["baseline", "dpar"])
def test_resume_after_kill_equals_uninterrupted_run_bitwise(tmp_path, kind):
    write_random_dataset(tmp_path / "data", count=24)
    extra = []
    if kind == "dpar":
        entropies = torch.rand(24, 16) * 3
        PatchTable.from_entropies(entropies, 1.5, 4, 4).save(str(tmp_path / "patches.pt"))
        extra = ["--patches", tmp_path / "patches.pt"]
    common = [kind, "--data", tmp_path / "data", "--steps", 5, "--batch-size", 8, "--ckpt-every", 2, *extra]
    full = train.train(train_args(common + ["--out", tmp_path / "full"]))

    def kill_at_step_3(record, model):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train.train(train_args(common + ["--out", tmp_path / "resumed"]), on_step=kill_at_step_3)
    assert [r["step"] for r in _log(tmp_path / "resumed")] == [1, 2, 3]
    resumed = train.train(train_args(common + ["--out", tmp_path / "resumed", "--resume"]))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert len({r["loss"] for r in full}) > 1
    for key in ("loss", "grad_norm", "flops", "cum_flops"):
        assert [r[key] for r in _log(tmp_path / "resumed")] == [r[key] for r in full], key
    full_weights, resumed_weights = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert full_weights.keys() == resumed_weights.keys()
    for name in full_weights:
        assert torch.equal(full_weights[name], resumed_weights[name]), name


def test_flop_budget_stops_and_resume_checks_settings(tmp_path):
    write_random_dataset(tmp_path / "data", count=16)
    common = ["baseline", "--data", tmp_path / "data", "--batch-size", 8, "--out", tmp_path / "run"]
    one = train.train(train_args(common + ["--steps", 1]))
    budget = 2.5 * one[0]["flops"]
    records = train.train(train_args(common + ["--flop-budget", budget]))
    assert len(records) == 3 and records[-1]["cum_flops"] >= budget > records[-2]["cum_flops"]
    with pytest.raises(ValueError, match="--batch-size: 8 in .*, 4 now"):
        train.train(train_args(common[:-4] + ["--batch-size", 4, "--out", tmp_path / "run", "--steps", 4,
                                              "--resume"]))
    with pytest.raises(ValueError, match="--patches"):
        train.train(train_args(["dpar", "--data", tmp_path / "data", "--out", tmp_path / "d", "--steps", 1]))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    live = {}
    records = train.train(train_args(argv, NO_CLASS_DROPOUT), on_step=lambda record, model: live.update(
        parameters=torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])))
    parameters = live["parameters"]
    torch.save({"records": records, "parameters": parameters}, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _trained_model(argv):
    from dpar.pipeline.builders import load_model
    out = argv[argv.index("--out") + 1]
    return load_model(os.path.join(out, train.CHECKPOINT), argv[0])[0]


def test_two_process_gloo_ddp_keeps_replicas_in_sync(tmp_path):
    write_random_dataset(tmp_path / "data", count=16)
    argv = ["baseline", "--data", str(tmp_path / "data"), "--steps", "2", "--batch-size", "8",
            "--out", str(tmp_path / "ddp")]
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert [r["loss"] for r in rank0["records"]] == [r["loss"] for r in rank1["records"]]
    # without class dropout (random per rank) DDP on 2 x 4 images must match one process on 8
    single = train.train(train_args(argv[:-1] + [str(tmp_path / "single")], NO_CLASS_DROPOUT))
    torch.testing.assert_close([r["loss"] for r in rank0["records"]], [r["loss"] for r in single], rtol=1e-5, atol=0)
    # every rank holds the same replica after its last step, and rank 0 checkpointed it
    assert torch.equal(rank0["parameters"], rank1["parameters"])
    checkpointed = torch.cat([p.detach().reshape(-1) for p in _trained_model(argv).parameters()])
    assert torch.equal(rank0["parameters"], checkpointed)
    single_parameters = torch.cat([p.detach().reshape(-1) for p in _trained_model(argv[:-1] + [
        str(tmp_path / "single")]).parameters()])
    torch.testing.assert_close(rank0["parameters"], single_parameters, rtol=1e-4, atol=1e-6)


def test_patch_table_batches_and_threshold_for_reduction():
    entropies = torch.rand(10, 16) * 4
    table = PatchTable.from_entropies(entropies, 2.0, 4, 4)
    indices = torch.tensor([7, 2, 2, 9])
    lengths, cu = table.batch(indices)
    expected_lengths, expected_cu = dk.entropy_patch_lengths(entropies[indices], threshold=2.0, max_patch_size=4,
                                                             row_width=4)
    assert torch.equal(lengths, expected_lengths) and torch.equal(cu, expected_cu)
    threshold = threshold_for_reduction(entropies, 2.0, 4, 4)
    reached = PatchTable.from_entropies(entropies, threshold, 4, 4)
    assert reached.reduction >= 2.0
    lower = entropies.reshape(-1).sort().values
    below = lower[lower < threshold]
    if below.numel():
        assert PatchTable.from_entropies(entropies, float(below[-1]), 4, 4).reduction < 2.0
    with pytest.raises(ValueError, match="out of reach"):
        threshold_for_reduction(entropies, 5.0, 4, 4)


def test_patchify_refuses_an_entropy_model_of_smaller_vocabulary(tmp_path):
    import dataclasses

    from dpar.model.config import get_config
    from dpar.pipeline.builders import build_model
    from dpar.pipeline.patchify import patchify

    write_random_dataset(tmp_path / "data", count=4, vocab=16)
    config = dataclasses.asdict(get_config("entropy-tiny", vocab_size=8, grid_height=4, grid_width=4, num_heads=2,
                                           num_kv_heads=2))
    checkpoint.save_checkpoint(str(tmp_path / "entropy.safetensors"), kind="entropy", config=config, step=0,
                               model=build_model("entropy", config))
    with pytest.raises(ValueError, match=r"entropy.safetensors has a vocabulary of 8 codes .* has 16"):
        patchify(str(tmp_path / "data"), str(tmp_path / "entropy.safetensors"), str(tmp_path / "p.pt"), threshold=1.0)
    with pytest.raises(ValueError, match="vocabulary of 8"):
        train.train(train_args(["dpar", "--data", tmp_path / "data", "--out", tmp_path / "d", "--steps", 1,
                                "--batch-size", 2, "--entropy-ckpt", tmp_path / "entropy.safetensors",
                                "--threshold", 1.0]))


def test_nan_threshold_and_reduction_are_rejected():
    entropies = torch.rand(2, 16)
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        dk.entropy_patch_lengths(entropies, threshold=float("nan"), max_patch_size=4)
    with pytest.raises(ValueError, match="target reduction"):
        threshold_for_reduction(entropies, float("nan"), 4, 4)


def test_optimizer_is_torchs_fused_adamw_and_matches_the_multi_tensor_one():
    """make_optimizer takes the fused AdamW on CPU (one call per group, not ~5 ops per parameter); its steps agree
    with the foreach implementation, decay only on matrices."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))

    fused_model, reference_model = model(), model()
    fused = train.make_optimizer(fused_model, 1e-2, (0.9, 0.95), 0.05)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    groups = [{"params": [p for p in reference_model.parameters() if p.dim() >= 2], "weight_decay": 0.05},
              {"params": [p for p in reference_model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), foreach=True)
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, optimizer in ((fused_model, fused), (reference_model, reference)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, model()[0].weight)  # the steps moved the weights
