"""`dpar extract-codes` (ImageFolder -> token dataset with a VQ) and the real image path through train / sample /
evaluate --fid, on a tiny randomly initialised VQ with VQ-16's structure."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from dpar.__main__ import main as dpar_main
from dpar.model.vq import VQConfig, VQTokenizer
from dpar.pipeline import evaluate, extract_codes
from dpar.pipeline.data import TokenGridDataset

TINY = VQConfig(codebook_size=64, codebook_dim=4, base_channels=8, z_channels=8, norm_groups=4, usage_buffer=128)
SIZE = 64  # -> 4 x 4 token grids
MODEL_OVERRIDES = ["width=64", "num_heads=2", "num_kv_heads=2"]


@pytest.fixture(scope="module")
def real_path(tmp_path_factory):
    """(root, images dir, vq checkpoint) with two class folders of generated JPEGs of assorted sizes."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        for i, (height, width) in enumerate([(70, 90), (64, 64), (150, 100)]):
            base = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
            pixels = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width] // (label + 1)
            Image.fromarray(pixels).save(folder / f"img{i}.jpg", quality=90)
        (folder / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    VQTokenizer(TINY).save(str(root / "vq.pt"))
    return root, root / "images", root / "vq.pt"


def _extract_args(images, vq, out, *extra):
    parser = argparse.ArgumentParser()
    extract_codes.add_arguments(parser)
    return parser.parse_args(["--vq-ckpt", str(vq), "--images", str(images), "--size", str(SIZE), "--out", str(out),
                              "--device", "cpu", "--quiet", "--batch-size", "2", *extra])


def _files(out):
    return {name: np.load(out / "codes" / name) for name in sorted(os.listdir(out / "codes"))}


def test_command_help():
    root = ROOT
    result = subprocess.run([sys.executable, "-m", "dpar", "extract-codes", "--help"], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m dpar extract-codes" in result.stdout and "--ten-crop" in result.stdout


def test_shards_partition_the_images_and_read_torchrun_env(monkeypatch):
    shards = [extract_codes.shard(10, rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert extract_codes.shard(2, 2, 3) == []
    with pytest.raises(ValueError, match="rank"):
        extract_codes.shard(10, 3, 3)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert extract_codes.distributed_position() == (5, 8, 1)
    assert extract_codes.distributed_position(0, 2) == (0, 2, 1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert extract_codes.distributed_position() == (0, 1, 0)


def test_views_follow_llamagen_crops():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8))
    one = extract_codes.image_views(image, 32)
    two = extract_codes.image_views(image, 32, flip=True)
    ten = extract_codes.image_views(image, 32, ten_crop=True)
    assert one.shape == (1, 3, 32, 32) and two.shape == (2, 3, 32, 32) and ten.shape == (10, 3, 32, 32)
    assert one.dtype == torch.float32 and one.min() >= -1 and one.max() <= 1
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[0].flip(-1))
    expected = torch.from_numpy(extract_codes.center_crop(image, 35).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(ten[0], expected[:, :32, :32]) and torch.equal(ten[3], expected[:, 3:, 3:])
    assert torch.equal(ten[5], expected.flip(-1)[:, :32, :32])
    # ADM's centre crop: short side -> 32 (box-halved first when >= 2x), long side centred
    assert extract_codes.center_crop(image, 32).shape == (32, 32, 3)


def test_extract_codes_layout_resume_and_shards(real_path, tmp_path):
    root, images, vq = real_path
    out = tmp_path / "codes_flip"
    assert extract_codes.extract_codes(_extract_args(images, vq, out, "--flip", "--workers", "1")) == 6
    files = _files(out)
    assert sorted(files) == [f"{i}.npy" for i in range(6)]
    assert all(codes.shape == (1, 2, 16) and codes.dtype == np.int16 for codes in files.values())
    labels = [int(np.load(out / "labels" / f"{i}.npy")[0]) for i in range(6)]
    assert labels == [0, 0, 0, 1, 1, 1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["views"] == 2
    dataset = TokenGridDataset(str(out))
    assert (len(dataset), dataset.grid_height, dataset.vocab_size, dataset.num_classes) == (12, 4, 64, 2)
    # the stored codes are the VQ's codes of the image views (image 4 = dog/img1.jpg)
    tokenizer = VQTokenizer.load(str(vq))
    with Image.open(images / "dog" / "img1.jpg") as image:
        direct = tokenizer.encode(extract_codes.image_views(image.convert("RGB"), SIZE, flip=True))
    assert np.array_equal(files["4.npy"].reshape(2, 4, 4), direct.numpy())
    assert torch.equal(dataset[9][0], direct[1].flatten()) and int(dataset[9][1]) == 1

    # resume: only the missing image is encoded again, finished files are left alone
    os.remove(out / "codes" / "2.npy")
    (out / "labels" / "5.npy").rename(out / "labels" / "5.npy.partial")  # as a run killed mid-write leaves it
    stamps = {name: os.stat(out / "codes" / name).st_mtime_ns for name in files if name not in ("2.npy", "5.npy")}
    assert extract_codes.extract_codes(_extract_args(images, vq, out, "--flip", "--workers", "0")) == 2
    assert all(os.stat(out / "codes" / name).st_mtime_ns == stamp for name, stamp in stamps.items())
    assert all(np.array_equal(codes, files[name]) for name, codes in _files(out).items())
    assert extract_codes.extract_codes(_extract_args(images, vq, out, "--flip", "--workers", "0")) == 0

    # two shards (as two torchrun ranks) write the same dataset as one process
    sharded = tmp_path / "sharded"
    for rank in (1, 0):
        args = _extract_args(images, vq, sharded, "--flip", "--workers", "0", "--rank", str(rank), "--world-size", "2")
        assert extract_codes.extract_codes(args) == 3
    assert all(np.array_equal(codes, files[name]) for name, codes in _files(sharded).items())
    assert sorted(_files(sharded)) == sorted(files)
    # resuming with other settings is refused
    with pytest.raises(ValueError, match="other settings"):
        extract_codes.extract_codes(_extract_args(images, vq, out, "--ten-crop", "--workers", "0"))


def test_extract_codes_errors(real_path, tmp_path):
    root, images, vq = real_path
    with pytest.raises(ValueError, match="multiple of 16"):
        extract_codes.extract_codes(_extract_args(images, vq, tmp_path / "a", "--size", "40"))
    (tmp_path / "empty" / "class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-folders with images"):
        extract_codes.extract_codes(_extract_args(tmp_path / "empty", vq, tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="huggingface.co/FoundationVision/LlamaGen"):
        extract_codes.extract_codes(_extract_args(images, tmp_path / "missing.pt", tmp_path / "c"))
    broken = tmp_path / "broken" / "class"
    broken.mkdir(parents=True)
    (broken / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*truncated.jpg"):
        extract_codes.extract_codes(_extract_args(tmp_path / "broken", vq, tmp_path / "d", "--workers", "0"))


EXTRACTOR_MODULE = '''
import torch


def build(device):
    """A fixed random conv net: images [B, 3, H, W] in [0, 1] -> features [B, 4]."""
    torch.manual_seed(3)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten())
    return network.to(device).eval()
'''


def _user_extractor(folder, monkeypatch):
    """A user's feature extractor module on sys.path -> its "module:factory" name."""
    (folder / "my_features.py").write_text(EXTRACTOR_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return "my_features:build"


def test_extract_train_sample_and_fid_on_the_real_path(real_path, tmp_path, monkeypatch):
    root, images, vq = real_path
    data = tmp_path / "data"
    dpar_main(["extract-codes", "--vq-ckpt", str(vq), "--images", str(images), "--size", str(SIZE), "--ten-crop",
               "--out", str(data), "--device", "cpu", "--quiet", "--workers", "0"])
    assert len(TokenGridDataset(str(data))) == 60
    common = ["--data", str(data), "--steps", "2", "--batch-size", "4", "--quiet", "--device", "cpu",
              "--override", *MODEL_OVERRIDES]
    dpar_main(["train", "entropy", "--out", str(tmp_path / "entropy"), *common])
    entropy_ckpt = str(tmp_path / "entropy" / "checkpoint.safetensors")
    dpar_main(["train", "dpar", "--out", str(tmp_path / "dpar"), "--entropy-ckpt", entropy_ckpt, "--threshold", "3",
               *common])
    ckpt = str(tmp_path / "dpar" / "checkpoint.safetensors")
    grid = tmp_path / "samples.png"
    dpar_main(["sample", "--ckpt", ckpt, "--vq-ckpt", str(vq), "--entropy-ckpt", entropy_ckpt, "--threshold", "3",
               "--per-class", "2", "--out", str(grid), "--save-tensor", str(tmp_path / "samples.pt"),
               "--device", "cpu"])
    assert grid.read_bytes()[:4] == b"\x89PNG"
    samples = torch.load(tmp_path / "samples.pt")
    assert samples.shape == (4, 3, SIZE, SIZE) and samples.min() >= 0 and samples.max() <= 1

    extractor = _user_extractor(tmp_path, monkeypatch)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    fid_out = tmp_path / "fid"
    argv = ["--kind", "dpar", "--ckpt", ckpt, "--entropy-ckpt", entropy_ckpt, "--threshold", "3", "--fid", "6",
            "--vq-ckpt", str(vq), "--fid-out", str(fid_out), "--fid-extractor", extractor, "--batch-size", "4",
            "--device", "cpu"]
    against_folder = evaluate.evaluate(parser.parse_args([*argv, "--fid-ref", str(images / "cat")]))
    assert sorted(os.listdir(fid_out)) == [f"{i:06d}.png" for i in range(6)]
    assert np.isfinite(against_folder["fid"]) and against_folder["fid"] > 0 and against_folder["fid_samples"] == 6
    # a reference .npz holding the generated set's own statistics: FID ~ 0 (the PNGs are reused, not resampled)
    stamps = [os.stat(fid_out / name).st_mtime_ns for name in sorted(os.listdir(fid_out))]
    mu, sigma = evaluate.folder_statistics(str(fid_out), evaluate.load_extractor(extractor), SIZE)
    np.savez(tmp_path / "stats.npz", mu=mu.numpy(), sigma=sigma.numpy())
    against_stats = evaluate.evaluate(parser.parse_args([*argv, "--fid-ref", str(tmp_path / "stats.npz")]))
    assert abs(against_stats["fid"]) < 1e-6
    assert [os.stat(fid_out / name).st_mtime_ns for name in sorted(os.listdir(fid_out))] == stamps
    np.savez(tmp_path / "bad.npz", mean=mu.numpy())
    with pytest.raises(ValueError, match="needs 'mu' and 'sigma'"):
        evaluate.evaluate(parser.parse_args([*argv, "--fid-ref", str(tmp_path / "bad.npz")]))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.evaluate(parser.parse_args([*argv, "--fid", "1", "--fid-ref", str(images / "cat")]))
    with pytest.raises(ValueError, match="module:factory"):
        evaluate.load_extractor("my_features")
    with pytest.raises(ValueError, match="no callable"):
        evaluate.load_extractor("my_features:missing")


def test_fid_without_torch_fidelity_or_extractor_says_what_to_do(real_path, tmp_path):
    root, images, _ = real_path
    try:
        import torch_fidelity  # noqa: F401
        expected = "Inception weights not found"
    except ImportError:
        expected = "torch-fidelity.*--fid-extractor"
    with pytest.raises(RuntimeError, match=expected):
        evaluate.fid_against_reference(str(images / "cat"), str(images / "dog"),
                                       inception_weights=str(tmp_path / "missing.pth"))
