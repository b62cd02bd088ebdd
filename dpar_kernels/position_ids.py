"""HF-style packed batches: position ids that restart at 0 for every sequence -> cu_seqlens."""
import torch

from ._checks import check_tensor


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, *, return_max_seqlen: bool = False
                                 ) -> torch.Tensor | tuple[torch.Tensor, int]:
    """position_ids [T] or [B, T] integer, 0 at the start of each packed sequence and +1 per token after it.

    Returns cu_seqlens int32 [n+1] over the flattened tokens (each row of a [B, T] input also starts a sequence),
    and with return_max_seqlen=True also the longest sequence as an int. One host sync: the number of sequences
    depends on the values. Raises ValueError for a position that is neither 0 nor the previous one + 1.
    """
    check_tensor("position_ids", position_ids)
    if position_ids.dim() not in (1, 2):
        raise ValueError(f"position_ids must be [T] or [B, T], got shape {tuple(position_ids.shape)}")
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
    rows = (position_ids if position_ids.dim() == 2 else position_ids[None]).long()
    if rows.shape[1] == 0:
        cu_seqlens = torch.zeros(1, dtype=torch.int32, device=position_ids.device)
        return (cu_seqlens, 0) if return_max_seqlen else cu_seqlens
    starts = rows == 0
    if not bool((rows[:, 0] == 0).all() & (starts[:, 1:] | (rows[:, 1:] == rows[:, :-1] + 1)).all()):
        raise ValueError("position_ids must be 0 at each sequence start and grow by 1 per token within it")
    start_index = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat((start_index, start_index.new_tensor([rows.numel()]))).to(torch.int32)
    if return_max_seqlen:
        return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens
