"""One engine step: one scale for every running image, whatever scale each image is at.

The scheduler (``amskv.scheduler``) keeps the images it runs in *cohorts*: images admitted together, on a
contiguous run of KV slots, and so always at the same scale. A step packs the sequence rows of all the
cohorts it runs into one (T, C) tensor: the dense parts of the transformer (qkv, proj, FFN, head,
embeddings) run once on every token, and attention runs per cohort against that cohort's own cache
(``amskv.model.var.Packing``). Sampling and the VQVAE's running f_hat are per cohort.

Rows are laid out per image: row 2i is image i's conditional row and row 2i + 1 its unconditional one,
so that any run of a cohort's images is a contiguous run of rows, in the step's tensors and in the KV
pool. Every operation is row-independent (batch-invariant GEMMs, amskv/model/invariant.py; per-row
sampling; padded convolutions), so an image is bit-identical whether it runs alone or beside any mix of
other images, and equal to ``amskv.generate.generate_tokens`` on the same label, seed and parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from amskv.device import DeviceTimer
from amskv.generate import allocate_cache, decode_images, decode_previews, sample_scale
from amskv.kvcache.policy import KVPolicy
from amskv.kvcache.storage import KVCache, KVPool
from amskv.model.var import VAR, Packing
from amskv.model.vqvae import VQVAE
from amskv.sampling import RowParams, cfg_mix_pairs


@dataclass(eq=False)
class Cohort:
    """Images that run in lockstep on KV slots ``slot .. slot + n``; ``scale`` is the scale the next step runs."""

    slot: int
    labels: torch.Tensor  # (n,) int64
    seeds: torch.Tensor  # (n,) int64
    params: RowParams
    tags: list[Any]  # the caller's handle of each image
    previews: list[frozenset[int]]  # per image, the scales whose running image it wants
    cache: KVCache
    cond: torch.Tensor  # (2n, C) class embeddings, per image (conditional, unconditional)
    x: torch.Tensor  # (2n, tokens of `scale`, C) the next step's input
    f_hat: torch.Tensor  # (n, Cvae, pn_last, pn_last)
    tokens: list[torch.Tensor] = field(default_factory=list)  # per finished scale (n, pn^2)
    scale: int = 0
    order: int = 0  # admission order: the scheduler runs older cohorts first when a step must be smaller

    @property
    def n(self) -> int:
        return len(self.tags)

    def split(self, image: int, count: int) -> Cohort:
        """Images ``image .. image + count`` as a cohort of their own, on the same slots and cache rows."""
        part, rows = slice(image, image + count), slice(2 * image, 2 * (image + count))
        return Cohort(self.slot + image, self.labels[part], self.seeds[part], self.params.rows(image, count),
                      self.tags[part], self.previews[part], self.cache.split(image, count), self.cond[rows],
                      self.x[rows], self.f_hat[part], [t[part] for t in self.tokens], self.scale, self.order)


@dataclass
class StepResult:
    finished: list[tuple[Cohort, torch.Tensor]]  # cohorts past their last scale, with uint8 (n, H, W, C) images
    previews: list[tuple[Any, int, torch.Tensor]]  # (tag, scale, uint8 (H, W, C)) for the images that asked
    rows_per_scale: dict[int, int]  # images per scale in this step
    tokens: int  # sequence tokens the transformer ran (both CFG rows)
    refused_expansions: int = 0  # layer expansions refused for want of room, in the cohorts that finished
    seconds_ar: float = 0.0
    seconds_decode: float = 0.0


def new_cohort(var: VAR, policy: KVPolicy, pool: KVPool, slot: int, labels: torch.Tensor, seeds: torch.Tensor,
               params: RowParams, tags: list[Any], previews: list[frozenset[int]], order: int = 0) -> Cohort:
    """A cohort at scale 0 on slots ``slot .. slot + n`` of ``pool`` (labels, seeds on the model's device)."""
    cfg, n = var.config, labels.shape[0]
    kv_dtype = var.blocks_dtype
    cache = allocate_cache(var, policy, n, kv_dtype, labels.device, pool=pool, row_offset=2 * slot, growth=False)
    pairs = torch.stack((labels, torch.full_like(labels, var.null_class)), dim=1).view(2 * n)  # (n, 2) -> (2n,)
    cond = var.class_emb(pairs)  # (2n, C)
    first = cfg.scale_tokens[0]
    x = cond.unsqueeze(1).expand(2 * n, first, -1) + var.pos_start.expand(2 * n, first, -1) \
        + var.lvl_pos()[:, :first]  # (2n, first, C)
    f_hat = cond.new_zeros(n, cfg.cvae, cfg.patch_nums[-1], cfg.patch_nums[-1])
    return Cohort(slot, labels, seeds, params, list(tags), list(previews), cache, cond, x, f_hat, order=order)


@torch.no_grad()
def run_step(var: VAR, vae: VQVAE, cohorts: list[Cohort], decode_chunk: int = 8) -> StepResult:
    """Advance every cohort by one scale; cohorts that finish their last scale are decoded."""
    device = cohorts[0].labels.device if cohorts else torch.device("cpu")
    timer = DeviceTimer(device)  # CUDA events, read once at the end of the step: no sync to time each part
    cfg = var.config
    S, C, V = cfg.num_scales, cfg.embed_dim, cfg.vocab_size
    spans, xs, conds, caches, first = [], [], [], [], 0
    for c in cohorts:
        rows, length = 2 * c.n, cfg.scale_tokens[c.scale]
        spans.append((first, rows, length))
        first += rows * length
        xs.append(c.x.reshape(rows * length, C))  # (2n, L, C) -> (2n*L, C)
        conds.append(c.cond)
        c.cache.begin_scale(c.scale)
        caches.append(c.cache)
    packing = Packing(spans, caches, cohorts[0].labels.device)
    cond_rows = torch.cat(conds)  # (R, C)
    h = var.run_packed(torch.cat(xs), cond_rows, packing)  # (T, C)
    for c in cohorts:
        c.cache.end_scale()
    logits = var.logits_packed(h, cond_rows, packing)  # (T, V)
    lvl_pos = var.lvl_pos()
    previews: list[tuple[object, int, torch.Tensor]] = []
    rows_per_scale: dict[int, int] = {}
    finished: list[tuple[Cohort, torch.Tensor]] = []
    for c, (t0, rows, length) in zip(cohorts, spans, strict=True):
        si, n = c.scale, c.n
        rows_per_scale[si] = rows_per_scale.get(si, 0) + n
        ratio = si / (S - 1) if S > 1 else 0.0
        pairs = logits[t0:t0 + rows * length].view(n, 2, length, V)  # (2n*L, V) -> (n, 2, L, V)
        idx, nxt = sample_scale(var, vae.quantize, cfg_mix_pairs(pairs, c.params.cfg, ratio), c.seeds, c.params, si,
                                c.f_hat, lvl_pos, bool(c.params.more_smooth.any()))
        c.tokens.append(idx)
        wanted = [i for i, scales in enumerate(c.previews) if si in scales]
        if wanted:
            index = torch.tensor(wanted, dtype=torch.int64, device=c.f_hat.device)
            images = decode_previews(vae, c.f_hat.index_select(0, index))
            previews += [(c.tags[i], si, image) for i, image in zip(wanted, images, strict=True)]
        if nxt is not None:
            c.x = nxt.repeat_interleave(2, dim=0)  # (n, pn'^2, C) -> (2n, pn'^2, C): both CFG rows of each image
        c.scale += 1
    timer.mark()
    for c in cohorts:
        if c.scale == S:
            images = decode_images(vae, c.f_hat, c.tokens, ~c.params.more_smooth, decode_chunk)
            finished.append((c, images))
    refused = sum(len(c.cache.refused_expansions()) for c, _ in finished)
    timer.mark()
    seconds_ar, seconds_decode = timer.seconds()
    return StepResult(finished, previews, rows_per_scale, first, refused, seconds_ar=seconds_ar,
                      seconds_decode=seconds_decode)
