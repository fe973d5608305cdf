"""The batched next-scale sampler: one call runs every scale for a batch of labels and seeds.

Per image: label, seed and sampling parameters (cfg, top-k, top-p, more_smooth) may all differ within
a batch. There is no Python loop over images or tokens inside the scale loop.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from amskv.device import DeviceTimer
from amskv.kvcache.policy import KVPolicy
from amskv.kvcache.storage import KVCache, KVPool
from amskv.memory import KVPlan, plan_kv
from amskv.model.var import VAR
from amskv.model.vqvae import VQVAE
from amskv.sampling import RowParams, cfg_mix, filter_top_k_top_p_, sample_tokens, smooth_weights


@dataclass
class TokenResult:
    f_hat: torch.Tensor  # (B, Cvae, pn_last, pn_last) fp32
    tokens: list[torch.Tensor]  # per scale (B, pn*pn) int64
    kv_allocated_bytes: int
    kv_peak_stored_bytes: int
    kept_after_scale: list  # [scale][layer] -> kept scale indices
    smooth_rows: torch.Tensor | None = None  # (B,) bool: rows decoded from soft (more_smooth) codes
    expansions: dict[int, int] = field(default_factory=dict)
    unplanned_expansions: list[int] = field(default_factory=list)  # expansions beyond the profile's plan
    similarities: dict = field(default_factory=dict)
    seconds: float = 0.0
    scale_seconds: list[float] = field(default_factory=list)  # wall time of each scale, in order


def allocate_cache(var: VAR, policy: KVPolicy, batch: int, dtype: torch.dtype, device, observer=None,
                   pool: KVPool | None = None, row_offset: int = 0, growth: bool = True) -> KVCache:
    """The batch's cache on ``pool`` (rows ``row_offset ..``), or on a pool of its own for this batch when none is
    given (a CLI or benchmark call). A pool made for another plan, dtype or fewer images raises: the KV manager
    sizes its pool for every call it runs, so a mismatch is a bug, not a batch to allocate for silently.

    ``row_offset``/``growth``: a scheduler's cohort on its pool slots, never allocating (``KVCache``)."""
    cfg = var.config
    # the profile's plan, or the worst case when layers decide online
    plan = policy_plan(policy, cfg.patch_nums, cfg.depth)
    if pool is None:
        pool = KVPool(batch, cfg.num_heads, cfg.head_dim, list(plan.capacities), plan.workspace_tokens, dtype, device)
    elif not pool.fits(2 * batch, list(plan.capacities), plan.workspace_tokens, dtype, row_offset):
        raise ValueError(f"{batch} images from slot {row_offset // 2} under this plan do not fit the KV pool "
                         f"({pool.images} images, capacities {pool.capacities}, {pool.dtype})")
    return KVCache(policy, cfg.patch_nums, pool, 2 * batch, row_offset=row_offset, observer=observer, growth=growth)


@functools.lru_cache(maxsize=32)
def policy_plan(policy: KVPolicy, patch_nums: tuple[int, ...], depth: int) -> KVPlan:
    """``plan_kv`` of a policy object, computed once: the scheduler starts a cache per admission, and a policy's
    own plan never changes (policies are immutable once made; the key is the object itself)."""
    return plan_kv(policy, patch_nums, depth)


def plan_pool(var: VAR, policy: KVPolicy, images: int, dtype: torch.dtype, device) -> KVPool:
    """KV buffers for up to ``images`` images under ``policy``'s plan, allocated once and reused by batches."""
    cfg = var.config
    plan = policy_plan(policy, cfg.patch_nums, cfg.depth)
    return KVPool(images, cfg.num_heads, cfg.head_dim, list(plan.capacities), plan.workspace_tokens, dtype, device)


@torch.no_grad()
def generate_tokens(var: VAR, vae: VQVAE, labels: torch.Tensor, seeds: torch.Tensor, params: RowParams,
                    policy: KVPolicy, observer=None, pool: KVPool | None = None,
                    force_tokens=None, on_scale=None) -> TokenResult:
    """labels, seeds: (B,) int64 on the model's device.

    ``pool``: reuse its KV buffers instead of allocating. ``force_tokens(si, logits)``, for conformance tests:
    gets the raw (2B, pn^2, V) logits of every row (conditional rows, then unconditional, before CFG) and
    returns the (B, pn^2) tokens to use instead of sampled ones. ``on_scale(si, f_hat)``, for previews: called
    after scale si with the running (B, Cvae, pn_last, pn_last) f_hat, which it must not modify.
    """
    t0 = time.perf_counter()
    cfg, quant = var.config, vae.quantize
    B, S, device = labels.shape[0], cfg.num_scales, labels.device
    kv_dtype = var.blocks_dtype
    cache = allocate_cache(var, policy, B, kv_dtype, device, observer, pool)

    cond_BD = var.class_emb(torch.cat((labels, torch.full_like(labels, var.null_class))))  # (2B, C): cond | uncond
    lvl_pos = var.lvl_pos()  # (1, L, C)
    first_l = cfg.scale_tokens[0]
    x = cond_BD.unsqueeze(1).expand(2 * B, first_l, -1) + var.pos_start.expand(2 * B, first_l, -1) \
        + lvl_pos[:, :first_l]  # (2B, first_l, C)
    f_hat = cond_BD.new_zeros(B, cfg.cvae, cfg.patch_nums[-1], cfg.patch_nums[-1])
    smooth_any = bool(params.more_smooth.any())
    tokens = []
    timer = DeviceTimer(device)  # one mark per scale, read once at the end: no device sync per scale
    for si in range(S):
        ratio = si / (S - 1) if S > 1 else 0.0
        cache.begin_scale(si)
        h = var.run_blocks(x, cond_BD, kv_layers=cache)
        cache.end_scale()
        raw = var.get_logits(h, cond_BD)  # (2B, pn^2, V)
        forced = None if force_tokens is None else force_tokens(si, raw)  # (B, pn^2)
        idx, nxt = sample_scale(var, quant, cfg_mix(raw, params.cfg, ratio), seeds, params, si, f_hat, lvl_pos,
                                smooth_any, forced)
        tokens.append(idx)
        if on_scale is not None:
            on_scale(si, f_hat)
        if nxt is not None:
            x = nxt.repeat(2, 1, 1)  # (B, pn'^2, C) -> (2B, pn'^2, C): conditional rows, then unconditional
        timer.mark()
    scale_seconds = timer.seconds()  # waits for the last scale's kernels: time the work, not its launch
    return TokenResult(
        f_hat=f_hat, tokens=tokens, kv_allocated_bytes=cache.allocated_bytes,
        kv_peak_stored_bytes=cache.peak_stored_bytes, kept_after_scale=cache.kept_after_scale,
        smooth_rows=params.more_smooth, expansions=cache.expansions(),
        unplanned_expansions=cache.unplanned_expansions(), similarities=cache.similarities,
        seconds=time.perf_counter() - t0, scale_seconds=scale_seconds,
    )


def sample_scale(var: VAR, quant, logits: torch.Tensor, seeds: torch.Tensor, params: RowParams, si: int,
                 f_hat: torch.Tensor, lvl_pos: torch.Tensor, smooth: bool, forced: torch.Tensor | None = None):
    """Scale ``si`` from its CFG-mixed logits (B, pn^2, V), per row: filter (in place), sample (or take ``forced``),
    add the codes to ``f_hat`` (in place) and embed the next scale's input.

    Returns (tokens (B, pn^2), the next input (B, pn'^2, C) before CFG duplicates its rows, or None after the
    last scale). Shared by the whole-batch sampler and the scheduler's step (amskv/step.py), so both compute
    an image the same way. ``smooth``: some row uses ``more_smooth``.
    """
    cfg = var.config
    B, pn, S = logits.shape[0], cfg.patch_nums[si], cfg.num_scales
    ratio = si / (S - 1) if S > 1 else 0.0
    filter_top_k_top_p_(logits, params.top_k, params.top_p)
    idx = sample_tokens(logits, seeds, si) if forced is None else forced  # (B, pn^2)
    code = quant.embedding(idx)  # (B, pn^2, Cvae)
    if smooth:
        weights = smooth_weights(logits, seeds, si, ratio)  # (B, pn^2, V)
        # weights @ codebook: (B, pn^2, Cvae), in the GEMM form the engine chose (amskv/model/invariant.py)
        soft = quant.codebook_gemm.linear(weights, quant.embedding.weight.t())
        code = torch.where(params.more_smooth.view(B, 1, 1), soft, code)
    h_BChw = code.transpose(1, 2).reshape(B, cfg.cvae, pn, pn)  # (B, pn^2, Cv) -> (B, Cv, pn, pn)
    nxt = quant.next_autoregressive_input(si, f_hat, h_BChw)
    if si == S - 1:
        return idx, None
    pn_next, cur = cfg.patch_nums[si + 1], sum(cfg.scale_tokens[:si + 1])
    nxt = nxt.view(B, cfg.cvae, -1).transpose(1, 2)  # (B, Cv, pn', pn') -> (B, pn'^2, Cv)
    return idx, var.word_embed(nxt) + lvl_pos[:, cur:cur + pn_next * pn_next]  # (B, pn'^2, C)


@torch.no_grad()
def decode_images(vae: VQVAE, f_hat: torch.Tensor, tokens: list[torch.Tensor] | None = None,
                  exact_rows: torch.Tensor | None = None, chunk: int = 8) -> torch.Tensor:
    """Images as uint8 (B, H, W, C) on the CPU, decoding exactly ``chunk`` images per call.

    Convolutions pick kernels by batch size, which changes results in the last ulp. So f_hat is rebuilt
    from the tokens and every decoder call is padded to the same size: an image is then bit-identical
    whatever shares its batch. Rows where ``exact_rows`` is False (the soft ``more_smooth`` path) decode
    the sampler's own f_hat. Like the original demo, x in [0, 1] becomes uint8 by truncating x * 255.
    """
    out = []
    dtype = vae.decoder.conv_in.weight.dtype
    B = f_hat.shape[0]
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        part = _padded(f_hat[start:start + n], chunk)
        if tokens is not None:
            rebuilt = vae.quantize.idx_to_fhat([_padded(t[start:start + n], chunk) for t in tokens])
            keep = torch.ones(chunk, dtype=torch.bool, device=part.device)
            if exact_rows is not None:
                keep[:n] = exact_rows[start:start + n]
            part = torch.where(keep.view(-1, 1, 1, 1), rebuilt, part)
        img = vae.fhat_to_img(part.to(dtype))[:n].float().add_(1).mul_(0.5)  # [-1, 1] -> [0, 1]
        # (b, C, H, W) -> (b, H, W, C)
        out.append(img.mul_(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


@torch.no_grad()
def decode_previews(vae: VQVAE, f_hat: torch.Tensor) -> torch.Tensor:
    """The running f_hat of some rows as uint8 (n, H, W, C) images on the CPU, at the model's resolution.

    One decoder call for all the rows; unlike ``decode_images`` it is not padded to a fixed batch, so a
    preview's last bits may depend on how many rows asked for one (the final image never does).
    """
    img = vae.fhat_to_img(f_hat.to(vae.decoder.conv_in.weight.dtype)).float().add_(1).mul_(0.5)
    return img.mul_(255).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[0] == size:
        return x
    return torch.cat((x, x.new_zeros(size - x.shape[0], *x.shape[1:])))  # pad the batch to a fixed size
