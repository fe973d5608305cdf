"""Batch-invariant linear layers: an image's numbers do not depend on what else shares its batch.

A GEMM library picks its kernel and blocking from the problem size, so ``F.linear`` on (M, K) rows can round
a given row differently at M = 2 and at M = 64. A sampler turns such an ulp into a different token now and
then, and an image would change with its batch mates. Each layer therefore runs its GEMM in a ``GemmForm``:

- ``off``: plain ``F.linear``; fastest, and an image may change in its last bits with its batch mates;
- ``tiles``: tiles of exactly ``ROW_TILE`` rows (the last one zero-padded) as one batched matmul, so every
  row meets the same fixed-shape kernel at every batch size. Safe anywhere, but costs up to 2x on a CPU
  (docs/benchmarks.md);
- ``floor``: a plain GEMM whose row count is kept inside a range the engine checked at load: fewer than
  ``floor`` rows are zero-padded up to ``floor``, more than ``chunk`` rows run in pieces of ``chunk``. On CPUs
  where MKL rounds a row the same for every M above a small threshold (16 on an AMX Xeon) this costs nothing.

``auto`` (amskv.model.invariance_probe) checks, per layer shape and dtype, on this device and thread count,
which ``floor`` keeps rows bit-identical over the row counts the scheduler produces, and falls back to tiles
where none does. Convolutions pick kernels by batch size too; ``in_fixed_batches`` runs them on fixed-size
groups of images instead (the quantiser's Phi during sampling; the decoder pads likewise in ``decode_images``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Images per convolution call in ``in_fixed_batches``.
CONV_BATCH = 8
# Rows per GEMM tile. 64 keeps the padding small at the coarse scales (2 rows per image) and the batched
# matmul about as fast as one large GEMM at the fine ones (measured on the CPU, docs/benchmarks.md).
ROW_TILE = 64
MODES = ("auto", "tiles", "off")


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed on fixed ``ROW_TILE``-row tiles so each row is independent."""
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


def gemm_into(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = rows @ weight.T (+ bias) for 2-D ``rows``: the one GEMM call that both the probe checks and the
    ``floor`` form runs, so what was checked is exactly what runs."""
    if bias is None:
        torch.mm(rows, weight.t(), out=out)
    else:
        torch.addmm(bias, rows, weight.t(), out=out)


@dataclass(frozen=True)
class GemmForm:
    """How one layer's GEMM keeps rows independent: ``kind`` is ``plain``, ``floor`` or ``tiles``."""

    kind: str = "plain"
    floor: int = 1  # ``floor``: fewer rows are zero-padded up to this many
    chunk: int = 0  # ``floor``: more rows run in pieces of this many

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "plain":
            return F.linear(x, weight, bias)
        if self.kind == "tiles":
            return invariant_linear(x, weight, bias)
        return self._floor_linear(x, weight, bias)

    def _floor_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        *lead, K = x.shape
        # (..., K) -> (M, K), row-major as checked: a transposed view (word_embed's input at one image) would
        # reach the GEMM with other strides, and so another kernel, than the same rows in a copied batch
        rows = x.reshape(-1, K).contiguous()
        M, N = rows.shape[0], weight.shape[0]
        out = rows.new_empty(M, N)
        for start in range(0, M, self.chunk):  # the common case, floor <= M <= chunk, is one GEMM
            piece = rows[start:start + self.chunk]
            n = piece.shape[0]
            if n >= self.floor:
                gemm_into(piece, weight, bias, out[start:start + n])
            else:  # zero-pad up to the checked minimum; only the first n rows are kept
                full = rows.new_empty(self.floor, N)
                gemm_into(torch.cat((piece, piece.new_zeros(self.floor - n, K))), weight, bias, full)
                out[start:start + n] = full[:n]
        return out.view(*lead, N)  # (M, N) -> (..., N)

    def describe(self) -> str:
        if self.kind == "floor":
            return f"plain GEMM, rows padded to >= {self.floor}, in pieces of <= {self.chunk}"
        return "fixed 64-row tiles" if self.kind == "tiles" else "plain F.linear"


PLAIN = GemmForm()
TILES = GemmForm("tiles")


def in_fixed_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     size: int = CONV_BATCH) -> torch.Tensor:
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
    """nn.Linear (same parameters and state-dict keys) whose GEMM runs in a ``GemmForm`` (plain by default)."""

    gemm: GemmForm = PLAIN  # set by amskv.model.invariance_probe.apply_forms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm.linear(x, self.weight, self.bias)
