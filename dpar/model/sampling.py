"""Next-token sampling: classifier-free guidance, temperature, top-k and top-p (nucleus) filtering.

A token is drawn by inverting the cumulative distribution at one uniform u in (0, 1] per row (the first v with
cdf_v >= u * cdf_V, never a token of probability 0), the distribution of torch.multinomial. The uniforms come from
the caller's generator, drawn eagerly (sampling_noise: [B, 1], not [B, V] as Gumbel noise would need), so a
compiled decode step takes them as an input and needs no generator: compiled and eager sampling give the same
tokens for the same generator.
"""
import torch


def guided_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """logits [2B, V] = [conditional; unconditional] -> uncond + cfg_scale * (cond - uncond) [B, V]."""
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Sets to -inf every logit outside the top_k and outside the smallest set with probability >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The dtype probabilities are computed in: float64 logits stay float64, anything else becomes float32."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def sampling_noise(rows: int, *, temperature: float, dtype: torch.dtype, device,
                   generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Uniforms in (0, 1] [rows, 1] in sampling_dtype(dtype) for sample_logits(noise=...); None when greedy
    (temperature 0)."""
    if temperature == 0:
        return None
    return 1 - torch.rand(rows, 1, dtype=sampling_dtype(dtype), device=device, generator=generator)


def sample_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> int64 [B]. temperature 0 means greedy (argmax). ``noise`` [B, 1] from sampling_noise (then
    ``generator`` is not used), else drawn here from ``generator``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(sampling_dtype(logits.dtype)) / temperature
    probs = filter_logits(logits, top_k, top_p).softmax(-1)
    if noise is None:
        noise = sampling_noise(probs.shape[0], temperature=temperature, dtype=probs.dtype, device=probs.device,
                               generator=generator)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, noise * cdf[:, -1:]).squeeze(1)
