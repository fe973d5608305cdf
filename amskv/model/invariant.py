"""Batch-invariant linear layers: an image's numbers do not depend on what else shares its batch.

A GEMM library picks its kernel and blocking from the row count M, so ``F.linear`` on (M, K) rows can round a
given row differently at M = 2 and at M = 64 (seen on AVX-512 CPUs with MKL: every M >= 4 differs from M = 2
in the last ulp). A sampler turns such an ulp into a different token now and then, and an image would change
with its batch mates. Here every GEMM runs on tiles of exactly ``ROW_TILE`` rows (the last one zero-padded),
as one batched matmul: each row then meets the same kernel at every batch size, and is bit-identical alone
or in a batch. Convolutions pick kernels by batch size too; ``in_fixed_batches`` runs them on fixed-size
groups of images instead (the quantiser's Phi during sampling; the decoder pads likewise in ``decode_images``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Images per convolution call in ``in_fixed_batches``.
CONV_BATCH = 8
# Rows per GEMM tile. 64 keeps the padding small at the coarse scales (2 rows per image) and the batched
# matmul about as fast as one large GEMM at the fine ones (measured on the CPU, docs/benchmarks.md).
ROW_TILE = 64


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed so each output row is independent of the other rows."""
    *lead, K = x.shape
    rows = x.reshape(-1, K)  # (..., K) -> (M, K)
    M = rows.shape[0]
    tiles = -(-M // ROW_TILE)
    if tiles * ROW_TILE != M:
        rows = torch.cat((rows, rows.new_zeros(tiles * ROW_TILE - M, K)))  # pad M up to whole tiles
    # bmm with a stride-0 weight: one fixed-shape (ROW_TILE, K) x (K, N) GEMM per tile, never folded into one
    out = torch.bmm(rows.view(tiles, ROW_TILE, K), weight.t().unsqueeze(0).expand(tiles, K, weight.shape[0]))
    out = out.view(tiles * ROW_TILE, -1)[:M]  # (tiles, T, N) -> (M, N)
    if bias is not None:
        out = out + bias
    return out.view(*lead, weight.shape[0])  # (M, N) -> (..., N)


def in_fixed_batches(fn, x: torch.Tensor, size: int = CONV_BATCH) -> torch.Tensor:
    """``fn(x)`` for a batch-wise ``fn`` (a convolution), called on zero-padded groups of exactly ``size`` images."""
    # NCHW always: an upsampled 1x1 map arrives channels-last, and a zero-padded copy of it would not be,
    # so the two would meet different kernels
    x = x.contiguous()
    B = x.shape[0]
    groups = -(-B // size)
    if groups * size != B:
        x = torch.cat((x, x.new_zeros(groups * size - B, *x.shape[1:])))  # pad the batch to whole groups
    return torch.cat([fn(x[g * size:(g + 1) * size]) for g in range(groups)])[:B]


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that can switch to ``invariant_linear``."""

    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return invariant_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def set_batch_invariant(module: nn.Module, enabled: bool) -> None:
    """Switch every invariant-capable layer under ``module``."""
    for m in module.modules():
        if hasattr(m, "batch_invariant"):
            m.batch_invariant = enabled
