"""Stages 2 and 3 of the demo training: tokenise MNIST with the trained VQ-VAE, then train the VAR transformer.

The VAR is trained with teacher forcing (``VAR.forward`` applies the block-causal mask): cross-entropy over all
positions, 10 % label dropout to the null class, AdamW, warm-up then cosine. By default the schedule is
step-based, so a run is reproducible and resumes bit-identically. With ``time_budget_minutes`` it follows the
recipe's wall-clock schedule instead: the run always ends on time on a loaded machine, but how many steps it makes
depends on the machine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from amskv.config import VARConfig
from amskv_tools.demo.train_vqvae import batch_indices
from amskv.model.var import VAR
from amskv.model.vqvae import VQVAE

TOKENS_FILE = "tokens.pt"
VAR_FILE = "demo_var.pth"
VAR_CHECKPOINT = "var_checkpoint.pt"
NO_WEIGHT_DECAY = ("pos_1LC", "pos_start", "lvl_embed", "scale_mul")  # matrices that are not projections


@dataclass(frozen=True)
class TokenSet:
    indices: torch.Tensor  # (N, L) int16: all scales' code indices, concatenated
    var_input: torch.Tensor  # (N, L - 1, Cvae) float16: teacher-forcing inputs (idx_to_var_input)
    labels: torch.Tensor  # (N,) int64


@dataclass(frozen=True)
class VARTrainConfig:
    steps: int = 1100
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 200
    label_dropout: float = 0.1
    grad_clip: float = 2.0
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    checkpoint_every: int = 200
    max_minutes: float = 30.0  # hard cap per invocation
    # None: step-based schedule (reproducible). A number: the recipe's wall-clock schedule - train until this many
    # minutes have passed (summed over resumed invocations) with the cosine a function of elapsed / budget.
    time_budget_minutes: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class VARTrainResult:
    steps_done: int
    finished: bool
    seconds: float
    final_loss: float  # mean train CE over the last 50 steps
    token_accuracy_per_scale: list[float]  # teacher-forced argmax accuracy over the last 50 steps
    weights_path: Path
    loss_history: list[float]  # train CE of every step since step 0 (resumed runs included)


@torch.no_grad()
def tokenize(vae: VQVAE, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             progress: bool = True) -> TokenSet:
    """Indices per scale and teacher-forcing inputs for (N, 1, H, W) images in [-1, 1]."""
    vae.eval()
    indices, var_inputs = [], []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="tokenize", unit="batch", disable=not progress):
        idx_list = vae.img_to_idx(images[start:start + batch_size])
        indices.append(torch.cat(idx_list, dim=1).to(torch.int16))  # per-scale (B, pn*pn) -> (B, L)
        var_inputs.append(vae.quantize.idx_to_var_input(idx_list).to(torch.float16))
    return TokenSet(torch.cat(indices), torch.cat(var_inputs), labels.clone())


def save_tokens(tokens: TokenSet, path: str | Path) -> None:
    torch.save({"indices": tokens.indices, "var_input": tokens.var_input, "labels": tokens.labels}, path)


def load_tokens(path: str | Path) -> TokenSet:
    state = torch.load(path, weights_only=True)
    return TokenSet(state["indices"], state["var_input"], state["labels"])


def build_var(cfg: VARConfig, train_cfg: VARTrainConfig) -> VAR:
    """VAR with the reference initialisation (the original VAR code's init_weights): blocks start close to identity."""
    torch.manual_seed(train_cfg.seed)
    model = VAR(cfg)
    C, std = cfg.embed_dim, math.sqrt(1 / cfg.embed_dim / 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.trunc_normal_(module.weight, std=std, a=-2, b=2)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.Embedding):
                torch.nn.init.trunc_normal_(module.weight, std=std, a=-2, b=2)
        model.head.weight.mul_(train_cfg.init_head)
        model.head_nm.ada_lin[1].weight.mul_(train_cfg.init_adaln)
        for block in model.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))
            ada = block.ada_lin[1].weight  # (6C, C) rows: gamma1, gamma2, scale1, scale2, shift1, shift2
            ada[2 * C:].mul_(train_cfg.init_adaln)
            ada[:2 * C].mul_(train_cfg.init_adaln_gamma)
    return model


def make_optimizer(model: VAR, cfg: VARTrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and not any(key in name for key in NO_WEIGHT_DECAY)
        (decay if is_matrix else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def lr_at(step: int, cfg: VARTrainConfig, time_fraction: float | None = None) -> float:
    """Linear warm-up, then cosine to zero at the last step, or at the end of the budget if time_fraction is
    given (elapsed / budget; the warm-up factor then multiplies the cosine, as the recipe's wall-clock schedule)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    if time_fraction is not None:
        return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, time_fraction)))
    if step < cfg.warmup_steps:
        return cfg.lr * warm
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def drop_labels(labels: torch.Tensor, null_class: int, rate: float, seed: int, step: int) -> torch.Tensor:
    """Replace a ``rate`` fraction of labels with the null class (classifier-free guidance training)."""
    draw = torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(seed * 15_485_863 + step))
    return torch.where(draw < rate, torch.full_like(labels, null_class), labels)


def _save_checkpoint(path: Path, model, optimizer, step, history, elapsed) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": history, "elapsed": elapsed}, tmp)
    tmp.replace(path)  # atomic: a kill during the save never leaves a truncated checkpoint


def train_var(var_cfg: VARConfig, tokens: TokenSet, out_dir: str | Path, cfg: VARTrainConfig = VARTrainConfig(),
              resume: bool = False, progress: bool = True,
              max_new_steps: int | None = None, weights_name: str = VAR_FILE) -> VARTrainResult:
    """Train on a TokenSet; writes ``weights_name`` (plain state dict, buffers included) to out_dir.

    ``resume`` continues from the checkpoint in out_dir; ``max_new_steps`` ends this call early (checkpointed).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / VAR_CHECKPOINT
    model = build_var(var_cfg, cfg)
    optimizer = make_optimizer(model, cfg)
    step, elapsed_before = 0, 0.0
    history: list[list[float]] = []  # per step: [loss, accuracy of scale 0, ..., accuracy of scale S-1]
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, elapsed_before = state["step"], state["history"], state["elapsed"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    scale_of_token = model.lvl_1L[0]  # (L,) scale index per position
    n_scales, n_items = var_cfg.num_scales, tokens.labels.shape[0]
    timed = cfg.time_budget_minutes is not None
    budget_s = (cfg.time_budget_minutes or 0.0) * 60
    stop_at = cfg.steps if max_new_steps is None else min(cfg.steps, step + max_new_steps)
    t0 = time.perf_counter()

    def elapsed() -> float:  # training time over all invocations of this run
        return elapsed_before + time.perf_counter() - t0

    def done() -> bool:
        return elapsed() >= budget_s if timed else step >= cfg.steps

    # the bar counts seconds of the budget in time mode, steps otherwise, so its ETA is right in both
    bar = tqdm(total=round(budget_s) if timed else cfg.steps, initial=round(elapsed_before) if timed else step,
               desc="var", unit="s" if timed else "step", disable=not progress, mininterval=2.0)
    while not done() and step < (cfg.steps if timed else stop_at):
        if time.perf_counter() - t0 > cfg.max_minutes * 60 or (timed and max_new_steps is not None
                                                               and step >= stop_at):
            break
        lr = lr_at(step, cfg, elapsed() / budget_s if timed else None)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = batch_indices(step, n_items, cfg.batch_size, cfg.seed)
        target = tokens.indices[rows].long()  # (B, L)
        labels = drop_labels(tokens.labels[rows], model.null_class, cfg.label_dropout, cfg.seed, step)
        logits = model(labels, tokens.var_input[rows].float(), split_attention=True)  # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))  # (B*L, V) vs (B*L,)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(-1) == target).float().mean(0)  # (L,) accuracy per position
            per_scale = torch.zeros(n_scales).index_add_(0, scale_of_token, correct)
            per_scale /= torch.bincount(scale_of_token, minlength=n_scales)
        history.append([loss.item(), *per_scale.tolist()])
        step += 1
        if step % cfg.checkpoint_every == 0 or done():
            _save_checkpoint(ckpt_path, model, optimizer, step, history, elapsed())
        bar.update(round(elapsed()) - bar.n if timed else 1)
        bar.set_postfix(step=step, ce=f"{history[-1][0]:.3f}", lr=f"{lr:.2e}")
    bar.close()
    finished = done()
    if not finished:  # stopped early (cap or max_new_steps): keep the progress for --resume
        _save_checkpoint(ckpt_path, model, optimizer, step, history, elapsed())
    weights_path = out_dir / weights_name
    torch.save(model.state_dict(), weights_path)
    tail = history[-50:]
    mean = [sum(col) / len(tail) for col in zip(*tail)] if tail else [float("nan")] * (1 + n_scales)
    return VARTrainResult(steps_done=step, finished=finished, seconds=time.perf_counter() - t0,
                          final_loss=mean[0], token_accuracy_per_scale=mean[1:], weights_path=weights_path,
                          loss_history=[h[0] for h in history])
