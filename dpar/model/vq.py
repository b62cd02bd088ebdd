"""VQ-16 image tokenizer: LlamaGen's published architecture (taming-style conv encoder / decoder, l2-normalised
codebook), with state-dict keys and shapes of LlamaGen's released ``vq_ds16_c2i.pt`` so its weights load as they are.

``VQTokenizer.encode``: images float [B, 3, H, W] in [-1, 1] -> codes int64 [B, H/16, W/16] (raster order, as the
token datasets store them); ``decode``: codes -> images float32 [B, 3, H, W] (about [-1, 1]). Both run in chunks of
the batch under bf16 (or a given ``dtype``) autocast on a GPU; the nearest-code search is always float32.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

VQ16_URL = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt"


@dataclass(frozen=True)
class VQConfig:
    """Architecture of the tokenizer; the defaults are LlamaGen's VQ-16 (codebook 16384 x 8, downsample 16).

    The downsample factor is 2 ** (len(channel_multipliers) - 1); ``norm_groups`` must divide every width.
    ``usage_buffer`` is the length of LlamaGen's ``quantize.codebook_used`` buffer (kept for key compatibility).
    """
    codebook_size: int = 16384
    codebook_dim: int = 8
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    res_blocks: int = 2
    z_channels: int = 256
    norm_groups: int = 32
    usage_buffer: int = 65536

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions (1x1-conv q, k, v, output projection) plus a skip."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(layer(h), "b c h w -> b 1 (h w) c") for layer in (self.q, self.k, self.v))
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after zero padding right and bottom by one (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_channels: int, out_channels: int, blocks: int, attention: bool, groups: int) -> nn.Module:
    """One resolution level: ``blocks`` resnet blocks (``res``), each followed by attention on the coarsest level."""
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                              for i in range(blocks))
    level.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(blocks if attention else 0))
    return level


def _middle(channels: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, groups)])


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for index, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[index](h)
    return h


class Encoder(nn.Module):
    """images [B, 3, H, W] -> features [B, z_channels, H/ds, W/ds]."""

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers]
        groups, last = config.norm_groups, len(widths) - 1
        self.conv_in = nn.Conv2d(3, config.base_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for index, width in enumerate(widths):
            level = _level(config.base_channels if index == 0 else widths[index - 1], width, config.res_blocks,
                           index == last, groups)
            if index != last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
        self.mid = _middle(widths[-1], groups)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """features [B, z_channels, h, w] -> images [B, 3, h*ds, w*ds] (coarsest level first, one extra resnet block
    per level)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_multipliers][::-1]
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0], groups)
        self.conv_blocks = nn.ModuleList()
        for index, width in enumerate(widths):
            level = _level(widths[max(index - 1, 0)], width, config.res_blocks + 1, index == 0, groups)
            if index != len(widths) - 1:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Nearest l2-normalised codebook entry by cosine similarity (= the l2 distance between unit vectors)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)
        self.register_buffer("codebook_used", torch.zeros(config.usage_buffer))

    def codebook(self) -> torch.Tensor:
        """float32 [K, D], unit rows."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> codes int64 [B, h, w] (float32 search)."""
        flat = F.normalize(rearrange(z.float(), "b d h w -> b h w d"), dim=-1)
        return (flat @ self.codebook().T).argmax(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> unit vectors float32 [B, D, h, w]; codes are clamped into the codebook."""
        entries = F.embedding(codes.clamp(0, self.embedding.num_embeddings - 1), self.codebook())
        return rearrange(entries, "b h w d -> b d h w")


class VQTokenizer(nn.Module):
    """LlamaGen-compatible VQ tokenizer (module names: encoder, decoder, quantize, quant_conv, post_quant_conv)."""

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Quantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def _autocast(self, dtype: torch.dtype | None):
        """bf16 autocast on a GPU (or ``dtype``); float32 on the CPU unless ``dtype`` is given."""
        device = self.quant_conv.weight.device
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                              enabled=device.type == "cuda" or dtype is not None)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, chunk_size: int = 32, dtype: torch.dtype | None = None) -> torch.Tensor:
        """images float [B, 3, H, W] in [-1, 1] (H, W multiples of the downsample) -> codes int64 [B, H/ds, W/ds]."""
        ds = self.config.downsample
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float [B, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] % ds or images.shape[3] % ds:
            raise ValueError(f"images height and width must be multiples of {ds}; got {tuple(images.shape[2:])}")
        device = self.quant_conv.weight.device
        chunks = []
        for start in range(0, images.shape[0], chunk_size):
            with self._autocast(dtype):
                z = self.quant_conv(self.encoder(images[start:start + chunk_size].to(device)))
            chunks.append(self.quantize.indices(z))
        return torch.cat(chunks) if chunks else torch.empty(0, images.shape[2] // ds, images.shape[3] // ds,
                                                            dtype=torch.int64, device=device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, chunk_size: int = 32, dtype: torch.dtype | None = None) -> torch.Tensor:
        """codes int [B, h, w] -> images float32 [B, 3, h*ds, w*ds], about [-1, 1] (not clamped)."""
        if codes.is_floating_point() or codes.is_complex() or codes.ndim != 3:
            raise ValueError(f"codes must be integer [B, h, w]; got {codes.dtype} {tuple(codes.shape)}")
        device = self.quant_conv.weight.device
        ds = self.config.downsample
        chunks = []
        for start in range(0, codes.shape[0], chunk_size):
            with self._autocast(dtype):
                quant = self.post_quant_conv(self.quantize.lookup(codes[start:start + chunk_size].to(device)))
                chunks.append(self.decoder(quant).float())
        return torch.cat(chunks) if chunks else torch.empty(0, 3, codes.shape[1] * ds, codes.shape[2] * ds,
                                                            device=device)

    def save(self, path: str, with_config: bool = True) -> None:
        """LlamaGen's checkpoint format {"model": state_dict}, plus this config when it is not the VQ-16 default."""
        payload = {"model": self.state_dict()}
        if with_config and self.config != VQConfig():
            payload["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        torch.save(payload, path)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> VQTokenizer:
        """A tokenizer from LlamaGen's ``vq_ds16_c2i.pt`` (or a file ``save`` wrote), in eval mode on ``device``.

        FileNotFoundError saying where to download the official weights when ``path`` does not exist.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"VQ checkpoint {path!r} not found. Download LlamaGen's VQ-16 weights "
                                    f"vq_ds16_c2i.pt from {VQ16_URL} and pass its path with --vq-ckpt")
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
        state = payload.get("model", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict) or "quantize.embedding.weight" not in state:
            raise ValueError(f"{path} is not a LlamaGen VQ checkpoint (expected {{'model': state_dict}} with "
                             "quantize.embedding.weight)")
        config = payload.get("config")
        config = VQConfig(**{**config, "channel_multipliers": tuple(config["channel_multipliers"])}) \
            if config else VQConfig()
        with torch.device("meta"):
            tokenizer = cls(config)
        tokenizer.load_state_dict(state, strict=True, assign=True)
        return tokenizer.to(device).eval()
