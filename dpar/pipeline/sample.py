"""`dpar sample`: class-conditional image grids (PNG) from a trained DPAR or baseline, plus entropy / patch maps;
with --num-images N, N images by continuous batching into a folder of codes (dpar.pipeline.sample_many: B =
--batch-size slots kept busy, a progress bar, written as they finish, a killed run resumes).

Sampling knobs: --cfg-scale, --temperature, --top-k, --top-p; DPAR may raise --threshold / --max-patch-size above
their training values (bigger patches, fewer global steps). Tokens decode to pixels with the palette tokenizer
(--tokenizer) or, on the real image path, LlamaGen's VQ-16 decoder (--vq-ckpt vq_ds16_c2i.pt). The patch map shows,
per image, the decoded image, the entropy H_{i-1} that decided whether token i starts a patch, and the patches (each
a coloured box).
"""
from __future__ import annotations

import argparse
import os

import torch


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.no_grad()
def sample_tokens(model, labels: torch.Tensor, *, entropy_model=None, threshold=None, max_patch_size=4,
                  cfg_scale=1.0, temperature=1.0, top_k=None, top_p=None, seed=0, compile=False,
                  schedule="out_of_step"):
    """(tokens int64 [B, T], patch_lengths int32 [P] or None, cu_patches int32 [B+1] or None) from any model's
    generate (DPAR needs ``entropy_model`` and ``threshold``). ``compile``, ``schedule``: see model.generate (the
    same tokens)."""
    generator = torch.Generator(labels.device).manual_seed(seed)
    tokens, patches = model.generate(labels, entropy_model=entropy_model, threshold=threshold,
                                     max_patch_size=max_patch_size, cfg_scale=cfg_scale, temperature=temperature,
                                     top_k=top_k, top_p=top_p, generator=generator, return_patches=True,
                                     compile=compile, schedule=schedule)
    return (tokens, None, None) if patches is None else (tokens, patches.patch_lengths, patches.cu_patches)


def image_decoder(tokenizer_path: str | None, vq_ckpt: str | None, vocab_size: int, image_size: int | None = None,
                  device: str | torch.device = "cpu"):
    """codes int64 [B, H, W] -> images float32 [B, 3, S, S] in [0, 1] on the CPU, with the palette tokenizer at
    ``tokenizer_path`` (S = image_size or 64) or the LlamaGen VQ at ``vq_ckpt`` (S x S = image_size, else the VQ's
    own 16 H x 16 W)."""
    if vq_ckpt:
        from dpar.model.vq import VQTokenizer

        vq = VQTokenizer.load(vq_ckpt, device)
        if vocab_size > vq.vocab_size:
            raise ValueError(f"the model's vocabulary ({vocab_size}) exceeds the VQ codebook ({vq.vocab_size})")

        def decode_vq(codes: torch.Tensor) -> torch.Tensor:
            images = vq.decode(codes).add_(1).div_(2).clamp_(0, 1)
            if image_size and image_size != images.shape[-1]:
                images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bicubic",
                                                         antialias=True).clamp_(0, 1)
            return images.cpu()
        return decode_vq
    from .tokenizer import PaletteTokenizer

    palette = PaletteTokenizer.load(tokenizer_path)
    return lambda codes: palette.decode(codes.cpu(), image_size or 64)


def save_image_grid(images: torch.Tensor, path: str, columns: int, titles: list[str] | None = None) -> None:
    """images float [N, 3, H, W] in [0, 1] -> one PNG, ``columns`` per row, optional per-row titles."""
    plt = _pyplot()
    rows = -(-images.shape[0] // columns)
    cell = max(1.6, images.shape[-1] / 100)  # inches at dpi 100: large images keep their resolution
    figure, axes = plt.subplots(rows, columns, figsize=(cell * columns, cell * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < images.shape[0]:
            axis.imshow(images[index].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        if titles and index % columns == 0 and index // columns < len(titles):
            axis.set_title(titles[index // columns], fontsize=7, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_patch_map(images: torch.Tensor, entropies: torch.Tensor, patch_lengths: torch.Tensor,
                   cu_patches: torch.Tensor, grid_width: int, path: str) -> None:
    """One row per image: image [3, H, W], entropy map of H_{i-1} (nats), patches as coloured boxes."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    count, tokens = entropies.shape
    grid_height = tokens // grid_width
    figure, axes = plt.subplots(count, 3, figsize=(7.5, 2.4 * count), squeeze=False)
    deciding = torch.cat([torch.zeros(count, 1), entropies[:, :-1].float().cpu()], dim=1)
    for b in range(count):
        axes[b, 0].imshow(images[b].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        shown = axes[b, 1].imshow(deciding[b].reshape(grid_height, grid_width).numpy(), cmap="magma")
        figure.colorbar(shown, ax=axes[b, 1], fraction=0.046)
        lengths = patch_lengths[int(cu_patches[b]):int(cu_patches[b + 1])].tolist()
        axes[b, 2].imshow(torch.ones(grid_height, grid_width, 3).numpy())
        start = 0
        for index, length in enumerate(lengths):
            row, col = divmod(start, grid_width)
            axes[b, 2].add_patch(Rectangle((col - 0.5, row - 0.5), length, 1, edgecolor="black", linewidth=0.6,
                                           facecolor=plt.cm.tab20(index % 20), alpha=0.35 + 0.15 * (length - 1)))
            start += length
        axes[b, 2].set_title(f"{len(lengths)} patches / {tokens} tokens", fontsize=8)
        axes[b, 1].set_title("entropy H(i-1), nats", fontsize=8)
        for axis in axes[b]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="DPAR or baseline checkpoint")
    parser.add_argument("--kind", choices=("dpar", "baseline"), default="dpar")
    decoder = parser.add_mutually_exclusive_group()
    decoder.add_argument("--tokenizer", help="palette tokenizer .safetensors (decodes to pixels)")
    decoder.add_argument("--vq-ckpt", help="LlamaGen VQ checkpoint (vq_ds16_c2i.pt): decodes the real image path")
    parser.add_argument("--entropy-ckpt", help="entropy model checkpoint (dpar; and for --patch-map)")
    parser.add_argument("--threshold", type=float, help="dpar: entropy threshold (may exceed the training one)")
    parser.add_argument("--max-patch-size", type=int, default=4)
    parser.add_argument("--classes", type=int, nargs="*", help="class labels (default: all classes)")
    parser.add_argument("--per-class", type=int, default=4, help="images per class (one row each)")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the per-token step (the same tokens; pays inductor's compile time per "
                        "graph first, so it wins for long runs: benchmarks/RESULTS.md)")
    parser.add_argument("--schedule", choices=("out_of_step", "lockstep"), default="out_of_step",
                        help="DPAR: when the global step runs (dpar.model.schedule; the same tokens)")
    parser.add_argument("--num-images", type=int, help="sample this many images by continuous batching into the "
                        "folder --out (codes.bin + run.json; resumes a killed run); classes cycle over --classes")
    parser.add_argument("--batch-size", type=int, default=16, help="with --num-images: images sampled at once")
    parser.add_argument("--image-size", type=int, help="size of each decoded image (default: 64 for the palette "
                        "tokenizer, the VQ's own 16 x grid)")
    parser.add_argument("--out", required=True, help="output PNG of the sample grid (with --num-images: a folder)")
    parser.add_argument("--patch-map", help="also write an entropy / patch map PNG of the first row")
    parser.add_argument("--save-tensor", help="also save the images float [N, 3, S, S] (for `dpar evaluate` FID)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(args: argparse.Namespace) -> None:
    import dpar_kernels as dk

    from .builders import load_model

    if args.num_images is not None:
        return main_many(args)
    if not (args.tokenizer or args.vq_ckpt):
        raise ValueError("sample: --tokenizer or --vq-ckpt is needed to decode the PNG grid")
    model, info = load_model(args.ckpt, args.kind, args.device)
    decode = image_decoder(args.tokenizer, args.vq_ckpt, info["config"]["vocab_size"], args.image_size, args.device)
    entropy_model = load_model(args.entropy_ckpt, "entropy", args.device)[0] if args.entropy_ckpt else None
    classes = args.classes if args.classes else list(range(info["config"]["num_classes"]))
    labels = torch.tensor(classes, device=args.device).repeat_interleave(args.per_class)
    tokens, _, _ = sample_tokens(model, labels, entropy_model=entropy_model,
                                 threshold=args.threshold, max_patch_size=args.max_patch_size,
                                 cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, compile=args.compile, schedule=args.schedule)
    grid = (info["config"]["grid_height"], info["config"]["grid_width"])
    images = decode(tokens.reshape(-1, *grid))
    save_image_grid(images, args.out, args.per_class, [f"class {c}" for c in classes])
    if args.save_tensor:
        torch.save(images, args.save_tensor)
    if args.patch_map:
        if entropy_model is None:
            raise ValueError("--patch-map needs --entropy-ckpt")
        first = tokens[:args.per_class]
        entropies = entropy_model.entropies(first).cpu()
        threshold = args.threshold if args.threshold is not None else float(entropies.median())
        lengths, cu = dk.entropy_patch_lengths(entropies, threshold=threshold, max_patch_size=args.max_patch_size,
                                               row_width=grid[1])
        save_patch_map(images[:args.per_class], entropies, lengths, cu, grid[1], args.patch_map)
    print(f"{len(labels)} samples -> {args.out}")


def main_many(args: argparse.Namespace) -> None:
    """--num-images: continuous batching into the folder --out, then a one-line summary."""
    from .builders import load_model
    from .sample_many import sample_many

    model, info = load_model(args.ckpt, args.kind, args.device)
    entropy_model = None
    if args.kind == "dpar":
        if not args.entropy_ckpt or args.threshold is None:
            raise ValueError("sample --num-images with a DPAR model needs --entropy-ckpt and --threshold")
        entropy_model = load_model(args.entropy_ckpt, "entropy", args.device)[0]
    classes = args.classes if args.classes else list(range(info["config"]["num_classes"]))
    settings = dict(ckpt=os.path.abspath(args.ckpt), kind=args.kind, threshold=args.threshold,
                    max_patch_size=args.max_patch_size, cfg_scale=args.cfg_scale, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p)
    summary = sample_many(model, classes, num_images=args.num_images, batch_size=args.batch_size, out=args.out,
                          seed=args.seed, entropy_model=entropy_model, threshold=args.threshold,
                          max_patch_size=args.max_patch_size, cfg_scale=args.cfg_scale,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          schedule=args.schedule, compile=args.compile, settings=settings)
    steps = "" if "global_steps_per_image" not in summary else (
        f", {summary['global_steps_per_image']:.1f} global steps and {summary['local_steps_per_image']:.1f} local "
        f"steps per image ({args.schedule}, batch {args.batch_size})")
    print(f"{summary['images']} images in {summary['seconds']:.1f} s: {summary['images_per_s']:.2f} images/s, "
          f"{summary['global_tokens_per_image']:.1f} global tokens per image{steps} -> {args.out}")
