"""Pure-PyTorch entropy: the reference for tests (bounded memory, chunked); the "torch" backend is torch_backend.py."""
import torch

ROW_CHUNK_ELEMENTS = 1 << 24  # rows handled per step so probabilities never exceed ~64 MB


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _entropy_of_logits(z: torch.Tensor) -> torch.Tensor:
    """z [..., V] float32/64 -> entropy [...] in nats; -inf entries contribute nothing."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [N, V] any float dtype -> entropy [N] (float64 for float64 input, else float32)."""
    z_dtype = compute_dtype(logits.dtype)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    out = torch.empty(logits.shape[0], dtype=z_dtype, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        z = logits[start:start + rows].to(z_dtype)
        # shifted by the row max before scaling (as the kernels' online state): a tiny temperature cannot overflow
        out[start:start + rows] = _entropy_of_logits((z - z.amax(-1, keepdim=True)) / temperature)
    return out


def linear_entropy_reference(hidden, weight, bias=None, temperature: float = 1.0) -> torch.Tensor:
    """Materialises the full logits: hidden [N, D] @ weight[V, D].T (+ bias [V]) -> entropy [N]. Tests only."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return _entropy_of_logits(logits.to(compute_dtype(logits.dtype)) / temperature)


class OnlineEntropy:
    """Running (max m, sum exp(z-m) s, sum (z-m)exp(z-m) w) over vocabulary chunks; entropy = log s - w/s."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device):
        self.m = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.s = torch.zeros(rows, dtype=dtype, device=device)
        self.w = torch.zeros(rows, dtype=dtype, device=device)

    def update(self, z: torch.Tensor) -> None:
        """z [rows, v] scaled logits of the next vocabulary chunk."""
        m_chunk = z.amax(dim=-1)
        m_new = torch.maximum(self.m, m_chunk)
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        shifted = z - safe[:, None]
        e = shifted.exp()
        s_chunk = e.sum(-1)
        w_chunk = torch.where(e > 0, shifted * e, torch.zeros_like(e)).sum(-1)
        scale = torch.where(self.s > 0, (self.m - safe).exp(), torch.zeros_like(self.s))
        self.w = scale * (self.w + (self.m - safe).nan_to_num(0.0, 0.0, 0.0) * self.s) + w_chunk
        self.s = scale * self.s + s_chunk
        self.m = m_new

    def entropy(self) -> torch.Tensor:
        return self.s.log() - self.w / self.s


def linear_entropy(hidden, weight, bias=None, temperature: float = 1.0,
                   row_chunk: int = 1024, vocab_chunk: int = 4096) -> torch.Tensor:
    """Chunked over N and V: never holds more than [row_chunk, vocab_chunk] logits. Returns float32 [N]."""
    dtype = compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, dtype=dtype, device=hidden.device)
    for r0 in range(0, n, row_chunk):
        h = hidden[r0:r0 + row_chunk]
        state = OnlineEntropy(h.shape[0], dtype, hidden.device)
        for v0 in range(0, v, vocab_chunk):
            z = (h @ weight[v0:v0 + vocab_chunk].T).to(dtype)
            if bias is not None:
                z = z + bias[v0:v0 + vocab_chunk].to(dtype)
            state.update(z / temperature)
        out[r0:r0 + row_chunk] = state.entropy()
    return out
