"""The LlamaGen-compatible VQ-16 tokenizer: key/shape compatibility, checkpoint format, encode/decode contracts."""
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TESTS

from dpar.model.vq import VQ16_URL, VQConfig, VQTokenizer

DATA = os.path.join(TESTS, "data", "llamagen_vq16_state_dict.txt")
# the same five-level structure as VQ-16 (downsample 16), a few thousand parameters
TINY = VQConfig(codebook_size=64, codebook_dim=4, base_channels=8, z_channels=8, norm_groups=4, usage_buffer=128)


def _expected_vq16() -> dict[str, tuple[int, ...]]:
    with open(DATA) as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return {key: tuple(int(d) for d in dims.split(",")) for key, dims in rows}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _tiny(seed=0) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(TINY).eval()


def test_full_vq16_state_dict_matches_llamagen_keys_and_shapes():
    with torch.device("meta"):
        model = VQTokenizer(VQConfig())
    expected = _expected_vq16()
    assert len(expected) == 344
    assert _shapes(model) == expected
    assert list(model.state_dict()) == list(expected)  # same order as LlamaGen's module tree
    assert model.config.downsample == 16 and expected["quantize.embedding.weight"] == (16384, 8)
    # LlamaGen's README: 72M parameters
    assert sum(p.numel() for p in model.parameters()) == 71_883_403


def test_tiny_config_has_the_vq16_key_structure():
    assert list(_tiny().state_dict()) == list(_expected_vq16())


def test_random_vq16_saved_in_llamagen_format_loads(tmp_path):
    torch.manual_seed(0)
    original = VQTokenizer(VQConfig()).eval()
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": original.state_dict()}, path)  # the released file's format: no config, fp32
    loaded = VQTokenizer.load(str(path))
    assert loaded.config == VQConfig() and not loaded.training
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 16, 32) * 2 - 1
    codes = loaded.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (2, 1, 2)
    assert torch.equal(codes, original.encode(images))
    decoded = loaded.decode(codes)
    assert decoded.dtype == torch.float32 and decoded.shape == (2, 3, 16, 32) and decoded.isfinite().all()


def test_tiny_save_load_round_trip_keeps_config(tmp_path):
    model = _tiny()
    model.save(str(tmp_path / "tiny.pt"))
    loaded = VQTokenizer.load(str(tmp_path / "tiny.pt"))
    assert loaded.config == TINY
    images = torch.rand(3, 3, 64, 48) * 2 - 1
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_encode_picks_the_nearest_normalised_code_in_float64():
    model = _tiny(1)
    images = torch.rand(5, 3, 64, 64) * 2 - 1
    codes = model.encode(images, chunk_size=2)
    assert codes.shape == (5, 4, 4) and codes.dtype == torch.int64
    with torch.no_grad():
        z = model.quant_conv(model.encoder(images)).double()
    vectors = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, TINY.codebook_dim), dim=-1)
    codebook = F.normalize(model.quantize.embedding.weight.double(), dim=-1)
    distances = torch.cdist(vectors, codebook)
    chosen = distances.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, distances.min(1).values, atol=1e-6)  # ties aside, the argmin
    assert torch.equal(codes, model.encode(images, chunk_size=5))  # chunking changes nothing


def test_decode_shapes_chunking_and_out_of_range_codes():
    model = _tiny(2)
    codes = torch.randint(0, TINY.codebook_size, (3, 2, 3))
    images = model.decode(codes, chunk_size=2)
    assert images.shape == (3, 3, 32, 48) and images.dtype == torch.float32 and images.isfinite().all()
    assert torch.allclose(images, model.decode(codes, chunk_size=3), atol=1e-5)
    # decoding equals the codebook entry -> post_quant_conv -> decoder path
    with torch.no_grad():
        entries = F.normalize(model.quantize.embedding.weight, dim=-1)[codes].permute(0, 3, 1, 2)
        assert torch.allclose(images, model.decoder(model.post_quant_conv(entries)), atol=1e-5)
    wild = codes.clone()
    wild[0, 0, 0], wild[1, 1, 1] = -7, 10 ** 6
    assert torch.allclose(model.decode(wild), model.decode(wild.clamp(0, TINY.codebook_size - 1)))
    assert model.decode(codes.to(torch.int32)).shape == images.shape
    assert model.decode(codes[:0]).shape == (0, 3, 32, 48) and model.encode(images[:0]).shape == (0, 2, 3)


def test_reduced_precision_autocast_stays_close_to_float32():
    model = _tiny(3)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    exact, low = model.encode(images), model.encode(images, dtype=torch.bfloat16)
    assert low.dtype == torch.int64 and (low == exact).float().mean() >= 0.75  # near-ties may flip
    decoded, reference = model.decode(exact, dtype=torch.bfloat16), model.decode(exact)
    assert decoded.dtype == torch.float32
    error, scale = (decoded - reference).abs(), reference.abs().max()
    assert error.mean() < 1e-2 * scale and error.max() < 0.1 * scale  # bf16 through ~40 layers


def test_bad_inputs_are_value_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match="images must be float"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images must be float"):
        model.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="codes must be integer"):
        model.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="codes must be integer"):
        model.decode(torch.zeros(4, dtype=torch.int64))


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt") as error:
        VQTokenizer.load(str(tmp_path / "nothing.pt"))
    assert VQ16_URL in str(error.value)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LlamaGen VQ checkpoint"):
        VQTokenizer.load(str(tmp_path / "other.pt"))
    state = _tiny().state_dict()
    del state["decoder.conv_out.bias"]
    torch.save({"model": state}, tmp_path / "truncated.pt")  # no config: read as VQ-16, whose shapes differ
    with pytest.raises(RuntimeError, match="size mismatch|Missing key"):
        VQTokenizer.load(str(tmp_path / "truncated.pt"))
