import os

import pytest
import torch

from dpar.pipeline import checkpoint
from dpar.pipeline.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint


def _model_and_optimizer(seed=0, width=6):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = str(tmp_path / "ckpt.safetensors")
    torch.manual_seed(123)
    save_checkpoint(path, kind="toy", config={"width": 6}, step=7, model=model, optimizer=optimizer,
                    extra={"cum_flops": 1.5})
    expected_draw = torch.rand(3)
    fresh, fresh_optimizer = _model_and_optimizer(seed=1)
    info = load_checkpoint(path, fresh, kind="toy", config={"width": 6}, optimizer=fresh_optimizer, restore_rng=True)
    assert info == {"kind": "toy", "config": {"width": 6}, "step": 7, "extra": {"cum_flops": 1.5}}
    assert torch.equal(torch.rand(3), expected_draw)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index in saved["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            saved_value, loaded_value = saved["state"][index][key], loaded["state"][index][key]
            assert torch.equal(torch.as_tensor(saved_value), torch.as_tensor(loaded_value))
    assert checkpoint_info(path)["step"] == 7


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    path = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, kind="toy", config={}, step=1, model=model, optimizer=optimizer)
    before = open(path, "rb").read()

    def crash(tensors, file_name, metadata=None):
        with open(file_name, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, kind="toy", config={}, step=2, model=model, optimizer=optimizer)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert checkpoint_info(path)["step"] == 1


def test_corrupt_and_missing_files_raise_value_error_naming_the_file(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(str(path), kind="toy", config={}, step=1, model=model, optimizer=optimizer)
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match="ckpt.safetensors.*corrupt"):
        load_checkpoint(str(path), model, kind="toy")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="garbage.safetensors"):
        checkpoint_info(str(tmp_path / "garbage.safetensors"))
    with pytest.raises(ValueError, match="missing.safetensors does not exist"):
        checkpoint_info(str(tmp_path / "missing.safetensors"))


def test_mismatched_checkpoint_raises_value_error(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, kind="toy", config={"width": 6}, step=1, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match="holds a 'toy' model, expected 'dpar'"):
        load_checkpoint(path, model, kind="dpar")
    with pytest.raises(ValueError, match=r"another config \(differs in \['width'\]\)"):
        load_checkpoint(path, model, kind="toy", config={"width": 8})
    wider, _ = _model_and_optimizer(width=8)
    with pytest.raises(ValueError, match="ckpt.safetensors: 0.weight has shape"):
        load_checkpoint(path, wider, kind="toy")
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(path, torch.nn.Linear(4, 6), kind="toy")
