"""The AMS-KV expansion signal: how similar a layer's keys are from one scale to the next.

Online AMS-KV compares it with theta at run time (``storage``), and calibration and ``amskv analyze`` measure it
offline (``amskv.analysis``, ``amskv.calibration``): one function, so calibration measures exactly what the policy
compares.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITY_MEASURES = ("cosine", "neg_l2")


def key_similarity(k_prev: torch.Tensor, k_cur: torch.Tensor, pn_prev: int, pn: int, measure: str = "cosine") -> float:
    """Similarity of the previous scale's keys, bilinearly resized (align_corners=False) to the current
    scale's grid, to the current keys; averaged over rows, heads and tokens.

    ``cosine``: the mean cosine similarity (what online AMS-KV compares with theta). ``neg_l2``: the negative
    mean L2 distance per token, the AMS-KV paper's measure. Resized unit keys are no longer unit-norm, so the
    two are not equivalent; calibration records both (docs/kv-cache.md §5 compares their rankings).

    k_prev: (rows, H, pn_prev^2, hd), k_cur: (rows, H, pn^2, hd). Shared by the online AMS-KV test and
    ``amskv analyze``, so calibration measures exactly what the policy compares with theta.
    """
    rows, H, _, hd = k_cur.shape
    grid = k_prev.float().permute(0, 1, 3, 2).reshape(rows * H, hd, pn_prev, pn_prev)  # -> (rows*H, hd, p, p)
    grid = F.interpolate(grid, size=(pn, pn), mode="bilinear", align_corners=False)
    resized = grid.reshape(rows, H, hd, pn * pn).permute(0, 1, 3, 2)  # -> (rows, H, pn^2, hd)
    if measure == "cosine":
        return F.cosine_similarity(resized, k_cur.float(), dim=-1).mean().item()
    if measure == "neg_l2":
        return -(resized - k_cur.float()).norm(dim=-1).mean().item()
    raise ValueError(f"similarity measure must be one of {SIMILARITY_MEASURES}, got {measure!r}")
