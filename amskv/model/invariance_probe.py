"""Choosing, at engine load, how each GEMM keeps an image independent of its batch mates (``batch_invariant``).

``auto`` checks on this device, at this thread count and for each of the model's GEMM shapes and dtypes,
whether a plain GEMM gives every row bit-identical results at every row count the scheduler produces, from
some small floor upwards, and wherever the row sits in the matrix. It picks the lowest such floor (smaller
row counts are padded up to it, larger ones run in pieces of ``PROBE_CHUNK``, the largest count checked),
and fixed tiles for a shape where no floor up to ``FLOOR_LIMIT`` holds. Measured on an AMX Xeon with MKL,
1 thread: every fp32 shape of VAR-d16 holds from 16 rows (docs/benchmarks.md); with 2 threads the large row
counts differ, so tiles are chosen there.

A row count the scheduler produces: 2 rows per image (conditional and unconditional), and a step packs the
tokens of several cohorts at different scales, T = sum over cohorts of 2 x images x scale tokens; the
AdaLN layers see 2 rows per image, the more_smooth product 1 row per token. T above ``PROBE_CHUNK`` runs as
whole pieces plus a remainder, so the remainder (T mod PROBE_CHUNK) is what must hold.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from amskv.model import invariant
from amskv.model.invariant import MODES, PLAIN, TILES, GemmForm, Linear
from amskv.model.vqvae import Phi

if TYPE_CHECKING:
    from amskv.model.var import VAR
    from amskv.model.vqvae import VQVAE

logger = logging.getLogger(__name__)


def apply_forms(var: VAR, vae: VQVAE, forms: Mapping[tuple, GemmForm], conv_fixed: bool) -> None:
    """Give every linear layer the form of its (in, out, dtype, "linear") shape (PLAIN where none is listed),
    the quantiser's soft-code product that of (V, Cvae, dtype, "codebook"), and switch the Phi convolutions to
    fixed groups when ``conv_fixed``."""
    for m in var.modules():
        if isinstance(m, Linear):
            m.gemm = forms.get((m.in_features, m.out_features, m.weight.dtype, "linear"), PLAIN)
    codebook = vae.quantize.embedding.weight  # (V, Cvae)
    vae.quantize.codebook_gemm = forms.get((codebook.shape[0], codebook.shape[1], codebook.dtype, "codebook"), PLAIN)
    for m in vae.modules():
        if isinstance(m, Phi):
            m.batch_invariant = conv_fixed

# The largest row count checked. A GEMM call packs its whole weight once, so every piece costs that again:
# pieces of 512 rows measured ~4 % slower than one call at d16 widths, pieces of 1024 about 2 %.
PROBE_CHUNK = 1024
FLOOR_LIMIT = 64  # a floor above one tile would pad more than the tiles do: use tiles instead
SMALL_ROWS = 32  # every row count up to this is checked (odd ones too: the more_smooth product)
PACKED_DRAWS = 8  # random mixes of cohorts at different scales

# (in_features K, out_features N, dtype, call): call is "linear" (a (N, K) weight and a bias) or "codebook"
# (the (K, N) codebook given transposed, no bias), because the layout and the bias pick the kernel too
Shape = tuple[int, int, torch.dtype, str]
_checked: dict[tuple, GemmForm] = {}  # per process: Engine.with_policy and tests build many engines on one model


def scheduler_row_counts(scale_tokens: Sequence[int], chunk: int = PROBE_CHUNK) -> list[int]:
    """The row counts to check: all up to SMALL_ROWS, 1-4 images alone at each scale (1-2 for the one row per
    token of the more_smooth product), random packed mixes; a count above ``chunk`` runs as whole pieces and
    its remainder, so the remainder is what is checked."""
    counts = set(range(1, SMALL_ROWS + 1)) | {chunk}
    for tokens in scale_tokens:
        counts |= {2 * images * tokens % chunk or chunk for images in (1, 2, 3, 4)}
        counts |= {images * tokens % chunk or chunk for images in (1, 2)}
    draw = random.Random(0)  # fixed draws: the same counts on every load, so the cache and the log agree
    for _ in range(PACKED_DRAWS):
        total = sum(2 * draw.randint(0, 3) * tokens for tokens in scale_tokens)
        counts.add(total % chunk or chunk)
    return sorted(c for c in counts if 1 <= c <= chunk)


def check_form(shape: Shape, device: torch.device, counts: Sequence[int]) -> GemmForm:
    """The cheapest form that keeps rows bit-identical for this GEMM shape over ``counts`` (see module doc)."""
    K, N, dtype, call = shape
    chunk = max(counts)
    key = (shape, str(device), torch.get_num_threads(), tuple(counts), invariant.gemm_into)
    if key in _checked:
        return _checked[key]
    gen = torch.Generator().manual_seed(0)
    if call == "codebook":
        weight = torch.randn(K, N, generator=gen).to(device, dtype).t()  # laid out as the codebook's .t()
    else:
        weight = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device, dtype)
    bias = torch.randn(N, generator=gen).to(device, dtype) if call == "linear" else None
    pool = torch.randn(chunk, K, generator=gen).to(device, dtype)
    reference = pool.new_empty(chunk, N)
    invariant.gemm_into(pool, weight, bias, reference)
    holds = {}
    for count in counts:
        at = (count * 7919) % (chunk - count + 1)  # each count reads other rows at another place in the matrix
        out = pool.new_empty(count, N)
        invariant.gemm_into(pool[at:at + count], weight, bias, out)
        holds[count] = torch.equal(out, reference[at:at + count])
    floor = None
    for count in reversed(counts):  # the lowest count from which every larger one holds
        if not holds[count]:
            break
        floor = count
    form = TILES if floor is None or floor > FLOOR_LIMIT else GemmForm("floor", floor, chunk)
    _checked[key] = form
    return form


def gemm_shapes(var: VAR, vae: VQVAE) -> list[Shape]:
    """Every distinct GEMM the sampler runs: the transformer's linear layers (all called with a bias, mat_qkv
    with its q/v bias) and the more_smooth path's soft-code product (vocabulary weights x codebook, no bias)."""
    shapes = {(m.in_features, m.out_features, m.weight.dtype, "linear") for m in var.modules()
              if isinstance(m, Linear)}
    codebook = vae.quantize.embedding.weight  # (V, Cvae)
    shapes.add((codebook.shape[0], codebook.shape[1], codebook.dtype, "codebook"))
    return sorted(shapes, key=str)


@dataclass
class Invariance:
    """What ``batch_invariant`` resolved to for one engine, for the start-up log and /v1/models."""

    mode: str  # auto, tiles or off
    forms: dict[Shape, GemmForm] = field(default_factory=dict)
    conv_fixed: bool = True  # the quantiser's Phi convolutions in fixed groups of images
    seconds: float = 0.0  # the check's time (auto)

    def describe(self) -> str:
        if self.mode == "off":
            return "off: plain F.linear and convolutions; an image may change in its last bits with its batch mates"
        kinds: dict[tuple[str, int], int] = {}
        for form in self.forms.values():
            key = (form.kind, form.floor)
            kinds[key] = kinds.get(key, 0) + 1
        gemms = "; ".join(
            f"{f'plain GEMM, rows >= {floor}' if kind == 'floor' else GemmForm(kind).describe()} ({n} of "
            f"{len(self.forms)} shapes)" for (kind, floor), n in sorted(kinds.items()))
        return f"{self.mode}: {gemms}; Phi convolutions in fixed groups of {invariant.CONV_BATCH}"


def choose(var: VAR, vae: VQVAE, mode: str, device: torch.device) -> Invariance:
    """Resolve ``mode`` (auto|tiles|off) for this model and device, and switch the model's layers to it."""
    if mode not in MODES:
        raise ValueError(f"batch_invariant must be one of {', '.join(MODES)}, got {mode!r}")
    began, shapes = time.perf_counter(), gemm_shapes(var, vae)
    if mode == "off":
        chosen = Invariance(mode, {shape: PLAIN for shape in shapes}, conv_fixed=False)
    elif mode == "tiles":
        chosen = Invariance(mode, {shape: TILES for shape in shapes})
    else:
        counts = scheduler_row_counts(var.config.scale_tokens)
        with torch.no_grad():
            chosen = Invariance(mode, {shape: check_form(shape, device, counts) for shape in shapes})
    chosen.seconds = time.perf_counter() - began
    apply_forms(var, vae, chosen.forms, chosen.conv_fixed)
    return chosen
