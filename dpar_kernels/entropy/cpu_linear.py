"""linear_entropy for the "cpu" backend: torch.matmul into one reused [row_chunk, vocab_chunk] logits buffer, the
running (m, s, w) entropy state of each row updated in place by the C++ op dpar_C.entropy_state_update.
Decode-sized inputs (at most LINEAR_MAX_ROWS float32 rows, the entropy model's step) multiply with dpar_C.linear
instead, which reads the weight about twice as fast as BLAS at so few rows (dpar_kernels/linear).

Peak extra memory: one logits tile plus the fp32 copies of one hidden and one weight chunk (fp16/bf16 inputs are
multiplied in fp32, which is faster and more accurate on CPU).
"""
import torch

from ..constants import LINEAR_MAX_ROWS

ROW_CHUNK = 1024
VOCAB_CHUNK = 4096


def linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   temperature: float = 1.0, row_chunk: int = ROW_CHUNK, vocab_chunk: int = VOCAB_CHUNK
                   ) -> torch.Tensor:
    """hidden [N, D], weight [V, D], bias [V] or None (CPU) -> entropy [N] (float64 for float64, else float32)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, dtype=acc)
    decode = n <= LINEAR_MAX_ROWS and acc == torch.float32
    tile_buffer = None if decode else torch.empty(min(row_chunk, n) * min(vocab_chunk, v), dtype=acc)
    update = torch.ops.dpar_C.entropy_state_update
    for r0 in range(0, n, row_chunk):
        h = hidden[r0:r0 + row_chunk].to(acc)
        rows = h.shape[0]
        m = torch.full((rows,), float("-inf"), dtype=acc)
        s = torch.zeros(rows, dtype=acc)
        w = torch.zeros(rows, dtype=acc)
        for v0 in range(0, v, vocab_chunk):
            weight_chunk = weight[v0:v0 + vocab_chunk].to(acc)
            bias_chunk = None if bias is None else bias[v0:v0 + vocab_chunk].to(acc)
            if decode:
                tile = torch.ops.dpar_C.linear(h, weight_chunk, bias_chunk)
            else:
                tile = tile_buffer[:rows * weight_chunk.shape[0]].view(rows, weight_chunk.shape[0])
                if bias is None:
                    torch.matmul(h, weight_chunk.T, out=tile)
                else:
                    torch.addmm(bias_chunk, h, weight_chunk.T, out=tile)
            update(tile, m, s, w, temperature)
        out[r0:r0 + rows] = s.log() - w / s
    return out
