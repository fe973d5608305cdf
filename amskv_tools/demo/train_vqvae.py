"""Stage 1 of the demo training: the multi-scale residual VQ-VAE (docs/demo-model.md, "Training").

``VectorQuantizer2.f_to_idx`` in ``amskv.model.vqvae`` is inference-only (no gradients, no losses), so the
differentiable version lives here. It uses the quantiser's own embedding, Phi modules and patch_nums, so the trained
weights are exactly what the serving code reads.

Everything that varies between steps (batch order, dead-code restarts) is a pure function of (seed, step), so a
run resumed from a checkpoint continues bit-identically to an uninterrupted one on one thread.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from amskv.config import VQVAEConfig
from amskv.model.vqvae import VQVAE, VectorQuantizer2

VAE_FILE = "demo_vae.pth"
VAE_CHECKPOINT = "vqvae_checkpoint.pt"


@dataclass(frozen=True)
class VQVAETrainConfig:
    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decays to lr * final_lr_ratio
    commitment: float = 0.25  # weight of ||sg(f_hat) - f||^2
    restart_every: int = 100  # dead-code restart period in steps ...
    restart_until: float = 0.8  # ... while step < restart_until * steps
    restart_scale: float = 0.3  # a dead code becomes restart_scale * a random encoder feature
    checkpoint_every: int = 200
    max_minutes: float = 30.0  # hard wall-clock cap; the run stops early (checkpointed) if it is hit
    seed: int = 0


@dataclass(frozen=True)
class VQVAETrainResult:
    steps_done: int
    finished: bool  # False when the wall-clock cap stopped the run before cfg.steps
    seconds: float  # wall time of this invocation (not counting earlier resumed-from runs)
    final_recon_mse: float  # mean recon MSE ([-1, 1] scale) over the last 50 steps
    final_vq_loss: float
    codes_used: int  # codes hit during the last restart window
    weights_path: Path
    recon_history: list[float]  # recon MSE of every step since step 0 (resumed runs included)


def quantize_for_training(quantizer: VectorQuantizer2, f: torch.Tensor, commitment: float):
    """Differentiable residual multi-scale quantisation of f (B, Cv, H, W).

    Returns (f_hat_st, vq_loss, idx_list): f_hat with the straight-through estimator (forward value f_hat,
    gradient to f as identity), the mean over scales of commitment*||sg(f_hat)-f||^2 + ||f_hat-sg(f)||^2, and
    the per-scale indices (B, pn*pn). The arithmetic mirrors ``VectorQuantizer2.f_to_idx``.
    """
    B, C, H, W = f.shape
    codes = quantizer.embedding.weight  # (V, Cv)
    f_detached = f.detach()
    f_rest = f_detached.clone()
    f_hat = torch.zeros_like(f)
    vq_loss = f.new_zeros(())
    idx_list = []
    last_si = len(quantizer.patch_nums) - 1
    for si, pn in enumerate(quantizer.patch_nums):
        z = f_rest if si == last_si else F.interpolate(f_rest, size=(pn, pn), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B, C, pn, pn) -> (B*pn*pn, C)
        with torch.no_grad():
            dist = z.square().sum(1, keepdim=True) + codes.square().sum(1)  # (N, V) squared L2 ...
            dist.addmm_(z, codes.T, alpha=-2, beta=1)  # ... |z|^2 + |e|^2 - 2 z.e
            idx = dist.argmin(1).view(B, pn * pn)
        h = quantizer.code_map(idx, pn)  # gradients reach the codebook through this lookup
        if si != last_si:
            h = F.interpolate(h, size=(H, W), mode="bicubic")
        h = quantizer.phi(si)(h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        vq_loss = vq_loss + commitment * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_detached)
        idx_list.append(idx)
    f_hat_st = f + (f_hat - f).detach()  # straight-through: value f_hat, gradient of identity to the encoder
    return f_hat_st, vq_loss / len(quantizer.patch_nums), idx_list


def lr_at(step: int, total: int, base: float, warmup: int, final_ratio: float) -> float:
    """Linear warm-up, then cosine from base to base * final_ratio at the last step."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, n_items: int, batch_size: int, seed: int) -> torch.Tensor:
    """The rows of step ``step``: epoch-wise permutations seeded by (seed, epoch), so no sampler state."""
    per_epoch = n_items // batch_size
    epoch, position = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[position * batch_size:(position + 1) * batch_size]


def build_vqvae(vae_cfg: VQVAEConfig, seed: int) -> VQVAE:
    torch.manual_seed(seed)
    model = VQVAE(vae_cfg)
    # small codes: the first restart re-seeds every unused one from real encoder features
    torch.nn.init.uniform_(model.quantize.embedding.weight, -1.0 / vae_cfg.vocab_size, 1.0 / vae_cfg.vocab_size)
    return model


def restart_dead_codes(quantizer: VectorQuantizer2, hits: torch.Tensor, f: torch.Tensor, scale: float,
                       generator: torch.Generator) -> int:
    """Re-initialise codes with no hits to ``scale`` x random encoder feature vectors; returns how many."""
    dead = (hits == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    vectors = f.detach().permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B, C, H, W) -> (B*H*W, C)
    pick = torch.randint(0, vectors.shape[0], (dead.numel(),), generator=generator)
    with torch.no_grad():
        quantizer.embedding.weight[dead] = scale * vectors[pick]
    return int(dead.numel())


@torch.no_grad()
def reconstruction_mse(vae: VQVAE, images: torch.Tensor, batch_size: int = 500) -> float:
    """Mean squared error ([-1, 1] scale) of encode -> quantise -> decode over ``images`` (N, 1, H, W)."""
    was_training = vae.training
    vae.eval()
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        total += F.mse_loss(vae.idx_to_img(vae.img_to_idx(x)), x, reduction="sum").item()
    vae.train(was_training)
    return total / images.numel()


@torch.no_grad()
def reconstruct(vae: VQVAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Reconstructions in [-1, 1] (N, 1, H, W) through the discrete tokens."""
    vae.eval()
    return torch.cat([vae.idx_to_img(vae.img_to_idx(images[s:s + batch_size]))
                      for s in range(0, images.shape[0], batch_size)])


def _save_checkpoint(path: Path, model, optimizer, step, hits, history, elapsed) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "hits": hits,
                "history": history, "elapsed": elapsed}, tmp)
    tmp.replace(path)  # atomic: a kill during the save never leaves a truncated checkpoint


def train_vqvae(vae_cfg: VQVAEConfig, images: torch.Tensor, out_dir: str | Path,
                cfg: VQVAETrainConfig = VQVAETrainConfig(), resume: bool = False,
                progress: bool = True, max_new_steps: int | None = None,
                weights_name: str = VAE_FILE) -> VQVAETrainResult:
    """Train on ``images`` (N, 1, H, W) in [-1, 1]; writes ``weights_name`` (plain state dict) to out_dir.

    ``resume`` continues from the checkpoint in out_dir; ``max_new_steps`` ends this call early (checkpointed),
    so a run can be split into pieces that together equal one uninterrupted run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / VAE_CHECKPOINT
    model = build_vqvae(vae_cfg, cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, elapsed_before = 0, 0.0
    hits = torch.zeros(vae_cfg.vocab_size, dtype=torch.int64)  # code hits in the current restart window
    history: list[tuple[float, float]] = []  # (recon, vq) per step
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, hits, elapsed_before = state["step"], state["hits"], state["elapsed"]
        history = [tuple(h) for h in state["history"]]
    model.train()
    quantizer = model.quantize
    scales = len(quantizer.patch_nums)
    restart_end = int(cfg.restart_until * cfg.steps)
    codes_used = int((hits > 0).sum())
    stop_at = cfg.steps if max_new_steps is None else min(cfg.steps, step + max_new_steps)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="vqvae", unit="step", disable=not progress, mininterval=2.0)
    while step < stop_at:
        if time.perf_counter() - t0 > cfg.max_minutes * 60:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.final_lr_ratio)
        x = images[batch_indices(step, images.shape[0], cfg.batch_size, cfg.seed)]
        f = model.encode(x)
        f_hat, vq_loss, idx_list = quantize_for_training(quantizer, f, cfg.commitment)
        recon = F.mse_loss(model.fhat_to_img(f_hat, clamp=False), x)
        optimizer.zero_grad(set_to_none=True)
        (recon + vq_loss).backward()
        optimizer.step()
        with torch.no_grad():
            per_scale = torch.stack([torch.bincount(i.flatten(), minlength=vae_cfg.vocab_size) for i in idx_list])
            hits += per_scale.sum(0)
            # training statistic of the original format: EMA of per-scale code frequencies (S, V)
            freq = per_scale.float() / per_scale.sum(1, keepdim=True)
            quantizer.ema_vocab_hit_SV[:scales].mul_(0.99).add_(freq, alpha=0.01)
        history.append((recon.item(), vq_loss.item()))
        step += 1
        if step % cfg.restart_every == 0:
            codes_used = int((hits > 0).sum())
            if step < restart_end:
                restart_dead_codes(quantizer, hits, f, cfg.restart_scale,
                                   torch.Generator().manual_seed(cfg.seed * 7919 + step))
            hits.zero_()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt_path, model, optimizer, step, hits, history,
                             elapsed_before + time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(recon=f"{history[-1][0]:.4f}", vq=f"{history[-1][1]:.4f}", codes=codes_used)
    bar.close()
    if step < cfg.steps:  # stopped by the wall-clock cap: keep the progress for --resume
        _save_checkpoint(ckpt_path, model, optimizer, step, hits, history, elapsed_before + time.perf_counter() - t0)
    weights_path = out_dir / weights_name
    torch.save(model.state_dict(), weights_path)
    tail = history[-50:] or [(float("nan"), float("nan"))]
    return VQVAETrainResult(
        steps_done=step, finished=step >= cfg.steps, seconds=time.perf_counter() - t0,
        final_recon_mse=sum(h[0] for h in tail) / len(tail), final_vq_loss=sum(h[1] for h in tail) / len(tail),
        codes_used=codes_used, weights_path=weights_path, recon_history=[h[0] for h in history])
