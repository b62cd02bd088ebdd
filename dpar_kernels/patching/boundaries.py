"""DPAR patch boundaries from entropies, vectorised over images and tokens (no Python loops)."""
import torch

from .._checks import INT32_MAX, check_float, check_int, check_tensor


def thresholds(threshold, batch: int) -> torch.Tensor | float:
    """A checked threshold: a float (TypeError for other scalars, ValueError for NaN), or a float [B] tensor
    (ValueError unless it has B entries) returned as float64 [B] on its own device."""
    if isinstance(threshold, torch.Tensor):
        check_float("threshold", threshold, ndim=1)
        if threshold.shape[0] != batch:
            raise ValueError(f"threshold must have one entry per image (B={batch}), got {threshold.shape[0]}")
        return threshold.to(torch.float64)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float or a [B] tensor, got {type(threshold).__name__}")
    if threshold != threshold:
        raise ValueError("threshold must not be NaN (an entropy is never above NaN: the patches would silently be "
                         "max_patch_size chunks)")
    return float(threshold)


def next_patch_starts(t: int | torch.Tensor, previous_entropy: torch.Tensor | None, threshold,
                      open_start: torch.Tensor, max_patch_size: int, row_width: int | None) -> torch.Tensor:
    """bool [B]: token t starts a patch, one token at a time (the sampler's form of patch_starts' rules).

    t: an int (every image at token t) or int64 [B] (each image at its own token); previous_entropy float [B]:
    H_{t-1} (None: no entropy rule, fixed-size patches); threshold: float or float64 [B]; open_start long [B]: the
    first token of each image's open patch."""
    per_image = isinstance(t, torch.Tensor)
    if not per_image and (t == 0 or (row_width is not None and t % row_width == 0)):
        return torch.ones_like(open_start, dtype=torch.bool)
    starts = t - open_start >= max_patch_size
    if per_image:
        starts |= (t == 0) if row_width is None else (t % row_width == 0)
    return starts if previous_entropy is None else (previous_entropy.double() > threshold) | starts


def patch_starts(entropy: torch.Tensor, threshold, max_patch_size: int, row_width: int | None) -> torch.Tensor:
    """bool [B, T]: True where a token starts a patch (the rules of SPEC "What DPAR is")."""
    batch, tokens = entropy.shape
    thr = thresholds(threshold, batch)
    if isinstance(thr, torch.Tensor):
        if thr.device != entropy.device:
            raise ValueError(f"threshold is on {thr.device} but entropy is on {entropy.device}")
        thr = thr[:, None]
    starts = torch.zeros(batch, tokens, dtype=torch.bool, device=entropy.device)
    starts[:, 0:1] = True
    starts[:, 1:] = entropy[:, :-1].to(torch.float64) > thr
    position = torch.arange(tokens, device=entropy.device)
    if row_width is not None:
        starts |= (position % row_width == 0)[None, :]
    run_start = torch.where(starts, position[None, :], torch.zeros_like(position)[None, :]).cummax(dim=1).values
    return (position[None, :] - run_start) % max_patch_size == 0


def entropy_patch_lengths(entropy: torch.Tensor, *, threshold, max_patch_size: int, row_width: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch lengths from per-token entropies.

    entropy [B, T] float: H_i, the entropy of the prediction of token i+1. threshold: float or [B] tensor.
    Token i+1 starts a patch when H_i > threshold; token 0 and (with row_width) every multiple of row_width
    start one; runs longer than max_patch_size are cut greedily into max-size chunks.
    Returns patch_lengths int32 [P_total] (images in order) and cu_patches int32 [B+1].
    A float threshold of NaN is a ValueError; a NaN entry of a threshold tensor (not read on the host) and a NaN
    entropy compare False, so they start no patch.
    """
    check_float("entropy", entropy, ndim=2)
    check_int("max_patch_size", max_patch_size, 1)
    if row_width is not None:
        check_int("row_width", row_width, 1)
    batch, tokens = entropy.shape
    starts = patch_starts(entropy, threshold, max_patch_size, row_width)
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([flat_starts[1:], flat_starts.new_full((1,), batch * tokens)])
    lengths = (ends - flat_starts).to(torch.int32)
    cu_patches = torch.zeros(batch + 1, dtype=torch.int32, device=entropy.device)
    cu_patches[1:] = starts.sum(dim=1).cumsum(0)
    return lengths, cu_patches


def lengths_to_cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """lengths [n] integer (non-negative) -> int32 [n+1] offsets starting at 0.

    ValueError when the lengths sum past int32 (offsets are int32); summed in int64, so nothing wraps silently.
    """
    check_tensor("lengths", lengths, ndim=1)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    offsets = lengths.long().cumsum(0)
    if not torch.compiler.is_compiling() and lengths.numel():
        smallest, total = torch.stack([lengths.min().long(), offsets[-1]]).tolist()  # one host read
        if smallest < 0:
            raise ValueError("lengths must be non-negative")
        if total > INT32_MAX:
            raise ValueError(f"lengths sum to {total}, more than int32 offsets hold (2**31-1)")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = offsets
    return cu


def patch_ids(patch_lengths: torch.Tensor, total: int) -> torch.Tensor:
    """patch_lengths [P] integer with sum == total -> int32 [total]: the patch index of every token."""
    check_tensor("patch_lengths", patch_lengths, ndim=1)
    if patch_lengths.is_floating_point() or patch_lengths.dtype == torch.bool:
        raise TypeError(f"patch_lengths must be an integer tensor, got {patch_lengths.dtype}")
    check_int("total", total, 0)
    if not torch.compiler.is_compiling():
        if patch_lengths.numel() and bool((patch_lengths < 0).any()):
            raise ValueError("patch_lengths must be non-negative")
        if int(patch_lengths.sum()) != total:
            raise ValueError(f"patch_lengths sum to {int(patch_lengths.sum())}, not total={total}")
    ids = torch.arange(patch_lengths.numel(), device=patch_lengths.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, patch_lengths.long(), output_size=total)


def static_patch_lengths(num_images: int, *, grid_height: int, grid_width: int, patches_per_image: int,
                         device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Content-independent patches (the static-patch baseline of DPAR's ablation): the same for every image.

    The ``patches_per_image`` patches are spread over the grid_height rows as evenly as possible (row r gets
    floor((r+1)P/H) - floor(rP/H)); inside a row of n patches, patch j covers columns
    [floor(jW/n), floor((j+1)W/n)), so the lengths differ by at most one and no patch crosses a row.
    Needs grid_height <= patches_per_image <= grid_height * grid_width.
    Returns patch_lengths int32 [num_images * P] and cu_patches int32 [num_images + 1], as entropy_patch_lengths.
    """
    check_int("num_images", num_images, 0)
    check_int("grid_height", grid_height, 1)
    check_int("grid_width", grid_width, 1)
    check_int("patches_per_image", patches_per_image, 1)
    if not grid_height <= patches_per_image <= grid_height * grid_width:
        raise ValueError(f"patches_per_image must be in [grid_height, grid_height * grid_width] = "
                         f"[{grid_height}, {grid_height * grid_width}], got {patches_per_image}")
    rows = torch.arange(grid_height + 1, device=device) * patches_per_image // grid_height
    per_row = rows.diff()
    row_start = torch.repeat_interleave(rows[:-1], per_row)
    index_in_row = torch.arange(patches_per_image, device=device) - row_start
    count = torch.repeat_interleave(per_row, per_row)
    lengths = ((index_in_row + 1) * grid_width // count - index_in_row * grid_width // count).to(torch.int32)
    cu_patches = (torch.arange(num_images + 1, device=device) * patches_per_image).to(torch.int32)
    return lengths.repeat(num_images), cu_patches
