"""Per-row sampling: CFG mixing, top-k / top-p filters and counter-based random numbers.

Every random number is a hash of (image seed, scale, token, stream), computed for the whole batch at
once. An image therefore depends only on its own seed and parameters, never on its batch mates or on
the batch size, and there is no Python loop over images or tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
STREAM_SAMPLE, STREAM_GUMBEL = 1, 2


@dataclass(frozen=True)
class SamplingParams:
    cfg: float = 4.0
    top_k: int = 900  # 0 switches the filter off
    top_p: float = 0.95  # 0 switches the filter off
    more_smooth: bool = False


@dataclass(frozen=True)
class RowParams:
    """Sampling parameters as per-row tensors for one batch."""

    cfg: torch.Tensor  # (B,) float64
    top_k: torch.Tensor  # (B,) int64
    top_p: torch.Tensor  # (B,) float64, so 1 - top_p rounds like the original's Python float
    more_smooth: torch.Tensor  # (B,) bool

    @classmethod
    def stack(cls, params: list[SamplingParams], device) -> RowParams:
        return cls(
            cfg=torch.tensor([p.cfg for p in params], dtype=torch.float64, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device),
            more_smooth=torch.tensor([p.more_smooth for p in params], dtype=torch.bool, device=device),
        )

    def rows(self, start: int, count: int) -> RowParams:
        """The parameters of rows start .. start + count."""
        part = slice(start, start + count)
        return RowParams(self.cfg[part], self.top_k[part], self.top_p[part], self.more_smooth[part])


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2^32).

    int64 products wrap modulo 2^64, which keeps the low 32 bits exact, so masking gives the
    same result as unsigned 32-bit arithmetic.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, si: int, stream: int) -> torch.Tensor:
    """One 32-bit key per row for (seed, scale, stream). seeds: (B,) int64 in [0, 2^63)."""
    lo, hi = seeds & MASK32, (seeds >> 32) & MASK32
    key = _mix32(lo ^ _mix32(hi + 0x9E3779B9))
    return _mix32(key ^ _mix32(torch.full_like(key, (si * 0x10001 + stream * 0x3C6EF372) & MASK32)))


def uniforms(keys: torch.Tensor, *shape: int) -> torch.Tensor:
    """Uniforms in (0, 1) of shape (B, *shape) from per-row keys; element j uses counter j."""
    n = 1
    for s in shape:
        n *= s
    counter = torch.arange(n, device=keys.device, dtype=torch.int64).view(1, n)
    h = _mix32(keys.view(-1, 1) ^ _mix32(counter + 0x2545F491))  # (B, n)
    h = _mix32(h + keys.view(-1, 1))
    return ((h >> 8).to(torch.float32) + 0.5).mul_(2.0**-24).view(-1, *shape)  # 24-bit mantissa


def cfg_mix(logits: torch.Tensor, cfg: torch.Tensor, ratio: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond with t = cfg * ratio per row; logits (2B, T, V) -> (B, T, V).

    t is formed in float64 and rounded once, as the original's Python-float arithmetic does.
    """
    B, T, V = logits.shape[0] // 2, logits.shape[1], logits.shape[2]
    return cfg_mix_pairs(logits.view(2, B, T, V).transpose(0, 1), cfg, ratio)  # (2B, T, V) -> (B, 2, T, V) view


def cfg_mix_pairs(pairs: torch.Tensor, cfg: torch.Tensor, ratio: float) -> torch.Tensor:
    """``cfg_mix`` for rows laid out per image: pairs (B, 2, T, V) = (conditional, unconditional) -> (B, T, V).

    The same arithmetic as ``cfg_mix``, so an image's logits are bit-identical in either layout."""
    B = pairs.shape[0]
    t = cfg * ratio  # (B,) float64
    one_plus_t = (1 + t).to(pairs.dtype).view(B, 1, 1)
    return one_plus_t * pairs[:, 0] - t.to(pairs.dtype).view(B, 1, 1) * pairs[:, 1]


def filter_top_k_top_p_(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks (in place, with -inf) what top-k and then top-p remove, per row. logits: (B, T, V)."""
    B, T, V = logits.shape
    k = top_k.clamp(0, V)
    if bool((k > 0).any()):
        kmax = int(k.max())
        kth = logits.topk(kmax, dim=-1, largest=True, sorted=True).values  # (B, T, kmax)
        idx = (k.clamp_min(1) - 1).view(B, 1, 1).expand(B, T, 1)
        threshold = kth.gather(-1, idx)  # (B, T, 1): the k-th largest value; ties with it survive
        remove = (logits < threshold) & (k > 0).view(B, 1, 1)
        logits.masked_fill_(remove, -torch.inf)
    if bool((top_p > 0).any()):
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)  # ascending mass
        remove_sorted = cum <= (1 - top_p).to(cum.dtype).view(B, 1, 1)
        remove_sorted[..., -1:] = False  # the largest entry always stays
        remove_sorted &= (top_p > 0).view(B, 1, 1)
        logits.masked_fill_(remove_sorted.scatter(-1, sorted_idx, remove_sorted), -torch.inf)
    return logits


def sample_tokens(logits: torch.Tensor, seeds: torch.Tensor, si: int) -> torch.Tensor:
    """Inverse-CDF draw of one token per (row, position) from softmax(logits). (B, T, V) -> (B, T)."""
    B, T, V = logits.shape
    u = uniforms(row_keys(seeds, si, STREAM_SAMPLE), T)  # (B, T)
    cdf = logits.softmax(dim=-1).cumsum_(dim=-1)  # (B, T, V)
    u = u * cdf[..., -1]  # the cumulative sum may end a few ulp below 1
    idx = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1)
    return idx.clamp_(max=V - 1)


def smooth_weights(masked_logits: torch.Tensor, seeds: torch.Tensor, si: int, ratio: float) -> torch.Tensor:
    """The original ``more_smooth`` path: Gumbel-softmax over the masked logits. (B, T, V) -> (B, T, V)."""
    B, T, V = masked_logits.shape
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    u = uniforms(row_keys(seeds, si, STREAM_GUMBEL), T, V)  # (B, T, V)
    gumbel = -torch.log(-torch.log(u))
    return (((1 + ratio) * masked_logits + gumbel) / tau).softmax(dim=-1)
