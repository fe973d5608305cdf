"""Checkpoint loading: infer the architecture from the state dict, check every key, build without copies.

Both files are plain state dicts in the original format (``.pth``) or ``.safetensors``. Models are built
on the meta device and the loaded tensors are assigned (``assign=True``), and ``.pth`` files are
memory-mapped, so a d30 checkpoint (8 GB fp32) never needs twice its size in RAM.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from amskv.config import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_DEMO, VARConfig, VQVAEConfig
from amskv.model.var import VAR, level_layout
from amskv.model.vqvae import VQVAE

# Entries that are pure functions of the architecture: accepted when absent, rebuilt from the config.
DERIVED_VAR_KEYS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
DERIVED_VAE_KEYS = re.compile(r"^quantize\.ema_vocab_hit_SV$")
KNOWN_PATCH_NUMS = {sum(p * p for p in pns): pns for pns in (PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_DEMO)}
MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model it is loaded into."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
        raise CheckpointError(f"checkpoint {path} is not a readable state dict (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path} is not a plain state dict of tensors")
    return sd


def _require(sd: dict, keys: list[str], what: str, path) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"{path} is not a {what} checkpoint: missing keys {missing[:MAX_LISTED]}")


def _indices(sd: dict, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def infer_var_config(sd: dict, path="<state dict>") -> VARConfig:
    _require(sd, ["pos_1LC", "word_embed.weight", "class_emb.weight", "head.weight", "blocks.0.attn.mat_qkv.weight"],
             "VAR", path)
    depth = len(_indices(sd, "blocks."))
    C = sd["pos_1LC"].shape[-1]
    L = sd["pos_1LC"].shape[1]
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else max(1, C // 64)
    if "lvl_1L" in sd:
        counts = torch.bincount(sd["lvl_1L"].flatten().long()).tolist()
        patch_nums = tuple(math.isqrt(c) for c in counts)
        if any(p * p != c for p, c in zip(patch_nums, counts, strict=True)):
            raise CheckpointError(f"{path}: lvl_1L does not describe square scales (tokens per scale {counts})")
    elif L in KNOWN_PATCH_NUMS:
        patch_nums = KNOWN_PATCH_NUMS[L]
    else:
        raise CheckpointError(f"{path}: cannot tell the scales from pos_1LC with {L} tokens and no lvl_1L")
    if sum(p * p for p in patch_nums) != L:
        raise CheckpointError(f"{path}: lvl_1L covers {sum(p * p for p in patch_nums)} tokens but pos_1LC has {L}")
    return VARConfig(
        depth=depth, embed_dim=C, num_heads=heads,
        num_classes=sd["class_emb.weight"].shape[0] - 1,
        vocab_size=sd["head.weight"].shape[0],
        cvae=sd["word_embed.weight"].shape[1],
        patch_nums=patch_nums,
        shared_aln="shared_ada_lin.1.weight" in sd,
        attn_l2_norm=l2,
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / C if "blocks.0.ffn.fc1.weight" in sd else 4.0,
    )


def infer_vqvae_config(sd: dict, patch_nums=PATCH_NUMS_256, path="<state dict>") -> VQVAEConfig:
    _require(sd, ["encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
                  "quant_conv.weight", "encoder.down.0.block.0.conv1.weight"], "VQVAE", path)
    ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    levels = _indices(sd, "encoder.down.")
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    last = levels[-1]
    return VQVAEConfig(
        vocab_size=sd["quantize.embedding.weight"].shape[0],
        z_channels=sd["quant_conv.weight"].shape[0],
        ch=ch, ch_mult=ch_mult, in_channels=in_ch,
        num_res_blocks=len(_indices(sd, "encoder.down.0.block.")),
        using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in sd,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        share_quant_resi=max(1, len(_indices(sd, "quantize.quant_resi.qresi_ls."))),
        patch_nums=tuple(patch_nums),
        ema_rows=sd["quantize.ema_vocab_hit_SV"].shape[0] if "quantize.ema_vocab_hit_SV" in sd else len(patch_nums),
    )


def _check_keys(model: torch.nn.Module, sd: dict, derived: re.Pattern, path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not derived.match(k)]
    unexpected = [k for k in sd if k not in expected]
    mis_shaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        parts = []
        named = (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped))
        for name, items in named:
            if items:
                more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
                parts.append(f"{len(items)} {name}: {items[:MAX_LISTED]}{more}")
        raise CheckpointError(f"{path} does not match the inferred architecture; " + "; ".join(parts))


def _assign(model: torch.nn.Module, sd: dict, derived_values: dict) -> None:
    full = dict(sd)
    full.update({k: v for k, v in derived_values.items() if k not in sd})
    model.load_state_dict(full, strict=True, assign=True)
    model.requires_grad_(False)  # as the original demo: also keeps CPU F.linear numerics identical
    model.eval()


def build_var(sd: dict, path="<state dict>", cfg: VARConfig | None = None) -> VAR:
    cfg = cfg or infer_var_config(sd, path)
    with torch.device("meta"):
        model = VAR(cfg)
    _check_keys(model, sd, DERIVED_VAR_KEYS, path)
    lvl, bias = level_layout(cfg.patch_nums)
    derived = {"lvl_1L": lvl, "attn_bias_for_masking": bias.contiguous()}
    derived.update({f"blocks.{i}.attn.zero_k_bias": torch.zeros(cfg.embed_dim) for i in range(cfg.depth)})
    _assign(model, sd, derived)
    return model


def build_vqvae(sd: dict, patch_nums=PATCH_NUMS_256, path="<state dict>") -> VQVAE:
    cfg = infer_vqvae_config(sd, patch_nums, path)
    with torch.device("meta"):
        model = VQVAE(cfg)
    _check_keys(model, sd, DERIVED_VAE_KEYS, path)
    sd = dict(sd)
    # the training statistic has one row per training scale; like the original, ignore a different count
    ema = sd.get("quantize.ema_vocab_hit_SV")
    if ema is None or ema.shape[0] != cfg.ema_rows:
        sd["quantize.ema_vocab_hit_SV"] = torch.zeros(cfg.ema_rows, cfg.vocab_size)
    _assign(model, sd, {})
    return model


def load_var(path: str | Path) -> VAR:
    return build_var(read_state_dict(path), path)


def load_vqvae(path: str | Path, patch_nums=PATCH_NUMS_256) -> VQVAE:
    return build_vqvae(read_state_dict(path), patch_nums, path)


def check_pair(var: VAR, vae: VQVAE, var_path="VAR", vae_path="VQVAE") -> None:
    """The VQVAE must speak the VAR's vocabulary and latent width."""
    vc, qc = var.config, vae.config
    problems = []
    if vc.vocab_size != qc.vocab_size:
        problems.append(f"vocabulary {vc.vocab_size} (VAR head) vs {qc.vocab_size} (VQVAE codebook)")
    if vc.cvae != qc.z_channels:
        problems.append(f"latent channels {vc.cvae} (VAR word_embed) vs {qc.z_channels} (VQVAE)")
    if problems:
        raise CheckpointError(f"{vae_path} does not fit {var_path}: " + "; ".join(problems))


def load_pair(var_path: str | Path, vae_path: str | Path) -> tuple[VAR, VQVAE]:
    var = load_var(var_path)
    vae = load_vqvae(vae_path, var.config.patch_nums)
    check_pair(var, vae, var_path, vae_path)
    return var, vae
