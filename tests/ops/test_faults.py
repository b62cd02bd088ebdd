"""Fault injection on `dpar train` and its checkpoints: signals, kills mid-write, a full disk, flipped bytes, a cut-off
log line, a non-finite loss, changed settings on --resume. Tiny configs, one thread: the suite is meant for CI."""
import errno
import glob
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import ROOT
from pipeline_helpers import TINY_OVERRIDES, train_args, write_random_dataset

from dpar.pipeline import checkpoint, evaluate, train
from dpar.pipeline.safeguards import NonFiniteLossError

ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads only add contention
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def dataset(tmp_path):
    write_random_dataset(tmp_path / "data", count=16)
    return tmp_path / "data"


def _common(data, out, steps, *extra):
    return ["baseline", "--data", data, "--out", out, "--steps", steps, "--batch-size", 4, *extra]


def _log(out):
    with open(os.path.join(out, train.LOG)) as f:
        return [json.loads(line) for line in f]


def _ckpt(out):
    return os.path.join(out, train.CHECKPOINT)


def _temp_files(out):
    return glob.glob(os.path.join(out, ".tmp-*"))


def _assert_same_run(out_a, out_b):
    keys = ("step", "loss", "grad_norm", "cum_flops")
    assert [[r[k] for k in keys] for r in _log(out_a)] == [[r[k] for k in keys] for r in _log(out_b)]
    weights_a, weights_b = checkpoint.read_checkpoint(_ckpt(out_a))[1], checkpoint.read_checkpoint(_ckpt(out_b))[1]
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        if not name.startswith("rng."):
            assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_the_last_finished_step_exits_nonzero_and_resumes_bitwise(tmp_path, dataset, signum):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dpar", "train", *map(str, _common(dataset, out, 100_000, "--ckpt-every", 1000,
            "--quiet", "--device", "cpu", "--override", *TINY_OVERRIDES))]
    process = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, train.LOG)
    deadline = time.monotonic() + 120
    while not (os.path.exists(log) and sum(1 for _ in open(log)) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert signal.Signals(signum).name in stderr and "--resume" in stderr
    stopped = checkpoint.checkpoint_info(_ckpt(out))["step"]
    assert stopped >= 2 and [r["step"] for r in _log(out)] == list(range(1, stopped + 1))
    assert not _temp_files(out)

    train.train(train_args(_common(dataset, out, stopped + 2, "--resume")))
    train.train(train_args(_common(dataset, tmp_path / "straight", stopped + 2)))
    _assert_same_run(out, tmp_path / "straight")


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from dpar.pipeline import checkpoint

    def write_half_then_die(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    model = torch.nn.Linear(4, 4)
    checkpoint.save_checkpoint(sys.argv[1], kind="entropy", config={}, step=1, model=model)
    checkpoint.save_file = write_half_then_die
    checkpoint.save_checkpoint(sys.argv[1], kind="entropy", config={}, step=2, model=model)
""")


def test_kill_during_checkpoint_write_keeps_the_old_one_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, env=ENV, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert checkpoint.checkpoint_info(str(path))["step"] == 1
    assert checkpoint.read_checkpoint(str(path))[1]  # tensors and checksum intact
    assert len(_temp_files(tmp_path)) == 1
    checkpoint.save_checkpoint(str(path), kind="entropy", config={}, step=3, model=torch.nn.Linear(4, 4))
    assert not _temp_files(tmp_path)
    assert checkpoint.checkpoint_info(str(path))["step"] == 3


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, dataset, monkeypatch):
    real_save = checkpoint.save_file
    saves = []

    def fills_the_disk(tensors, path, metadata=None):
        saves.append(path)
        if len(saves) < 2:
            return real_save(tensors, path, metadata=metadata)
        with open(path, "wb") as f:
            f.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="could not be written.*No space left.*previous checkpoint") as caught:
        train.train(train_args(_common(dataset, out, 6, "--ckpt-every", 2)))
    assert caught.value.errno == errno.ENOSPC
    assert checkpoint.checkpoint_info(_ckpt(out))["step"] == 2
    assert checkpoint.read_checkpoint(_ckpt(out))[1]
    assert not _temp_files(out)


def test_checkpoint_files_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        checkpoint.save_checkpoint(str(tmp_path / "c.safetensors"), kind="entropy", config={}, step=0,
                                   model=torch.nn.Linear(2, 2))
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "c.safetensors").st_mode & 0o777 == 0o644


def test_flipped_checkpoint_bytes_fail_the_checksum(tmp_path, dataset):
    out = tmp_path / "run"
    train.train(train_args(_common(dataset, out, 2)))
    with open(_ckpt(out), "r+b") as f:  # the end of the file is tensor data, past the JSON header
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.safetensors is corrupt.*checksum"):
        checkpoint.read_checkpoint(_ckpt(out))
    with pytest.raises(ValueError, match="checksum"):
        train.train(train_args(_common(dataset, out, 4, "--resume")))


def test_truncated_last_log_line_is_tolerated_by_resume_and_evaluate(tmp_path, dataset):
    out = tmp_path / "run"
    train.train(train_args(_common(dataset, out, 2)))
    log = os.path.join(out, train.LOG)
    with open(log, "a") as f:  # a kill while appending step 3's record (after step 2's checkpoint)
        f.write('{"step": 3, "loss": 2.7')
    with pytest.warns(UserWarning, match="truncated"):
        assert [r["step"] for r in evaluate.read_log(log)] == [1, 2]
    with pytest.warns(UserWarning, match="truncated"):
        train.train(train_args(_common(dataset, out, 4, "--resume")))
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    lines = open(log).read().splitlines()
    with open(log, "w") as f:
        f.write("\n".join([lines[0], "{not json", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl, line 2"):
        evaluate.read_log(log)


def test_non_finite_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, dataset, monkeypatch):
    calls = []

    class PoisonedAtStep3(train.LossModule):
        def forward(self, *args):
            calls.append(None)
            loss = super().forward(*args)
            return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "LossModule", PoisonedAtStep3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss nan.*last good checkpoint \(step 2\)"):
        train.train(train_args(_common(dataset, out, 6, "--ckpt-every", 2)))
    assert checkpoint.checkpoint_info(_ckpt(out))["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint.read_checkpoint(_ckpt(out))[1].values()
               if t.is_floating_point())
    assert [r["step"] for r in _log(out)] == [1, 2]


def test_huge_learning_rate_exits_nonzero_from_the_cli(tmp_path, dataset):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dpar", "train", *map(str, _common(
        dataset, out, 20, "--lr", 1e12, "--ckpt-every", 1, "--quiet", "--device", "cpu", "--override",
        *TINY_OVERRIDES))], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "training stopped" in result.stderr, result.stderr
    for tensor in checkpoint.read_checkpoint(_ckpt(out))[1].values():
        assert not tensor.is_floating_point() or torch.isfinite(tensor).all()


def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path, dataset):
    out = tmp_path / "run"
    train.train(train_args(_common(dataset, out, 2)))
    write_random_dataset(tmp_path / "other", count=16, seed=1)
    changed = r"(?s)--allow-changed.*--grad-clip: 1.0 .* 0.5 now.*--lr: 0.0001 .* 0.001 now"
    with pytest.raises(ValueError, match=changed):
        train.train(train_args(_common(dataset, out, 4, "--resume", "--lr", 1e-3, "--grad-clip", 0.5)))
    with pytest.raises(ValueError, match=r"--data: .*data' in .*other' now"):
        train.train(train_args(_common(tmp_path / "other", out, 4, "--resume")))
    assert checkpoint.checkpoint_info(_ckpt(out))["step"] == 2  # nothing trained by the refused runs
    records = train.train(train_args(_common(dataset, out, 4, "--resume", "--lr", 1e-3, "--allow-changed")))
    metadata = checkpoint.read_checkpoint(_ckpt(out))[0]
    assert {g["lr"] for g in json.loads(metadata["optim_param_groups"])} == {1e-3}
    assert records[-1]["lr"] == 1e-3 and json.loads(metadata["extra"])["settings"]["lr"] == 1e-3


def test_resume_without_a_checkpoint_is_an_error_and_keeps_the_log(tmp_path, dataset):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / train.LOG).write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"--resume: no checkpoint .*checkpoint.safetensors"):
        train.train(train_args(_common(dataset, out, 2, "--resume")))
    assert (out / train.LOG).read_text() == '{"step": 1}\n'
    with pytest.raises(ValueError, match="check --out"):  # a mistyped --out
        train.train(train_args(_common(dataset, tmp_path / "rnu", 2, "--resume")))
    assert not (tmp_path / "rnu").exists()


@pytest.mark.parametrize("flag, value", [("--grad-clip", -1), ("--grad-clip", 0), ("--steps", 0), ("--steps", -5),
                                         ("--flop-budget", -1), ("--flop-budget", math.nan), ("--ckpt-every", 0),
                                         ("--batch-size", 0), ("--lr", math.nan), ("--threshold", math.nan)])
def test_bad_arguments_are_refused_before_any_work(tmp_path, dataset, flag, value):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=flag):
        train.train(train_args(_common(dataset, out, 2, flag, value)))
    assert not out.exists()


def test_heldout_loss_of_a_nan_model_is_an_error(tmp_path, dataset):
    from dpar.pipeline.data import TokenGridDataset
    from dpar.pipeline.objectives import LossModule, heldout_loss

    out = tmp_path / "run"
    train.train(train_args(_common(dataset, out, 1)))
    model, _ = train.load_model(_ckpt(out), "baseline")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="held-out loss is nan"):
        heldout_loss(LossModule(model, 4), TokenGridDataset(str(dataset)), batch_size=8)
