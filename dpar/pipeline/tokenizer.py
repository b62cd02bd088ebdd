"""An in-project image tokenizer that needs no downloaded weights: a k-means colour palette (as in ImageGPT).

Why this choice: DPAR operates on any grid of discrete tokens from a VQ tokenizer (LlamaGen VQ-16 in the paper).
A learned VQ-GAN would need downloaded weights or hours of training; ImageGPT showed that a k-means palette of
RGB colours (512 clusters) on a downsampled image is a usable discrete image representation for autoregressive
models. It keeps the properties DPAR relies on: a codebook of a few hundred codes, a raster grid (16x16 or 32x32),
and spatially varying predictability (flat regions are low-entropy, textured ones high), and it decodes back to
pixels so samples can be looked at. Encoding: area-downsample to the grid, then assign every cell to its nearest
palette colour. Decoding: look the colours up (nearest-neighbour upsampling for display).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FORMAT = "dpar-palette-tokenizer-v1"


def _nearest(pixels: torch.Tensor, palette: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """pixels float [N, 3], palette float [K, 3] -> int64 [N] index of the nearest colour (squared L2)."""
    out = torch.empty(pixels.shape[0], dtype=torch.int64)
    palette_sq = (palette * palette).sum(1)
    for start in range(0, pixels.shape[0], chunk):
        block = pixels[start:start + chunk]
        distance = palette_sq[None, :] - 2 * block @ palette.T
        out[start:start + chunk] = distance.argmin(1)
    return out


def _kmeans_plus_plus(pixels: torch.Tensor, num_colors: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance."""
    palette = torch.empty(num_colors, 3)
    palette[0] = pixels[torch.randint(pixels.shape[0], (1,), generator=generator)]
    closest = ((pixels - palette[0]) ** 2).sum(1)
    for k in range(1, num_colors):
        palette[k] = pixels[torch.multinomial(closest + 1e-12, 1, generator=generator)]
        closest = torch.minimum(closest, ((pixels - palette[k]) ** 2).sum(1))
    return palette


def fit_palette(pixels: torch.Tensor, num_colors: int, iterations: int = 10, seed: int = 0,
                seeding_pixels: int = 16384) -> torch.Tensor:
    """k-means of pixels float [N, 3] -> palette float32 [K, 3]: k-means++ seeding on a sample of
    ``seeding_pixels`` pixels, then ``iterations`` Lloyd iterations on all of them.

    A cluster that loses all its pixels is re-seeded at the pixel worst served by the current palette.
    """
    if pixels.ndim != 2 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [N, 3], got {tuple(pixels.shape)}")
    if pixels.shape[0] < num_colors:
        raise ValueError(f"need at least num_colors={num_colors} pixels, got {pixels.shape[0]}")
    pixels = pixels.float()
    generator = torch.Generator().manual_seed(seed)
    sample = pixels[torch.randperm(pixels.shape[0], generator=generator)[:max(seeding_pixels, num_colors)]]
    palette = _kmeans_plus_plus(sample, num_colors, generator)
    for _ in range(iterations):
        assignment = _nearest(pixels, palette)
        sums = torch.zeros(num_colors, 3).index_add_(0, assignment, pixels)
        counts = torch.bincount(assignment, minlength=num_colors)
        palette = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], palette)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            error = ((pixels - palette[_nearest(pixels, palette)]) ** 2).sum(1)
            palette[empty] = pixels[error.topk(empty.numel()).indices]
    return palette


class PaletteTokenizer:
    """Images float [B, 3, H, W] in [0, 1] <-> codes int64 [B, grid, grid] in [0, num_colors)."""

    def __init__(self, palette: torch.Tensor, grid_size: int):
        if palette.ndim != 2 or palette.shape[1] != 3:
            raise ValueError(f"palette must be [K, 3], got {tuple(palette.shape)}")
        self.palette = palette.float().contiguous()
        self.grid_size = int(grid_size)

    @property
    def vocab_size(self) -> int:
        return self.palette.shape[0]

    @classmethod
    def fit(cls, images: torch.Tensor, num_colors: int = 256, grid_size: int = 16, iterations: int = 10,
            max_pixels: int = 100_000, seed: int = 0) -> PaletteTokenizer:
        """Fit the palette on (at most ``max_pixels`` sampled) grid cells of images float [B, 3, H, W]."""
        cells = cls._downsample(images, grid_size).permute(0, 2, 3, 1).reshape(-1, 3)
        generator = torch.Generator().manual_seed(seed)
        if cells.shape[0] > max_pixels:
            cells = cells[torch.randperm(cells.shape[0], generator=generator)[:max_pixels]]
        return cls(fit_palette(cells, num_colors, iterations, seed), grid_size)

    @staticmethod
    def _downsample(images: torch.Tensor, grid_size: int) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return F.interpolate(images.float(), size=(grid_size, grid_size), mode="area")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images float [B, 3, H, W] in [0, 1] -> codes int64 [B, grid, grid]."""
        cells = self._downsample(images, self.grid_size)
        batch = cells.shape[0]
        codes = _nearest(cells.permute(0, 2, 3, 1).reshape(-1, 3), self.palette)
        return codes.reshape(batch, self.grid_size, self.grid_size)

    def decode(self, codes: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        """codes int [B, h, w] (or [B, h*w] with a square grid) -> images float32 [B, 3, S, S] in [0, 1]."""
        if codes.ndim == 2:
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"flat codes need a square grid; got {codes.shape[1]} tokens")
            codes = codes.reshape(codes.shape[0], side, side)
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, h, w] or [B, h*w], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"codes must lie in [0, {self.vocab_size})")
        images = self.palette[codes.long().cpu()].permute(0, 3, 1, 2)
        if image_size is not None and image_size != codes.shape[-1]:
            images = F.interpolate(images, size=(image_size, image_size), mode="nearest")
        return images

    def save(self, path: str) -> None:
        save_file({"palette": self.palette}, path, metadata={"format": FORMAT, "grid_size": str(self.grid_size)})

    @classmethod
    def load(cls, path: str) -> PaletteTokenizer:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as error:
            raise ValueError(f"tokenizer file {path} is not a readable safetensors file: {error}") from error
        if metadata.get("format") != FORMAT:
            raise ValueError(f"tokenizer file {path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
        return cls(load_file(path)["palette"], int(metadata["grid_size"]))
