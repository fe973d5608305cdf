"""The multi-scale residual VQVAE of VAR (``vae_ch160v4096z32.pth``), checkpoint-compatible.

The encoder is only needed for tests and demo training; serving uses indices -> f_hat -> image.
Widths are configurable so the same classes hold the golden reference VAE (ch=32) and the demo model.
"""
from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from amskv.config import VQVAEConfig
from amskv.model.invariant import TILES, GemmForm, in_fixed_batches


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in the original; narrower demo layers use gcd(32, C) so the rule is inferable from shapes
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused qkv 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.w_ratio = channels**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.C, H, W).unbind(1)  # each (B, C, H, W)
        q = q.reshape(B, self.C, H * W).permute(0, 2, 1)  # (B, HW, C)
        w = torch.bmm(q, k.reshape(B, self.C, H * W)).mul_(self.w_ratio).softmax(dim=2)  # (B, HW_q, HW_k)
        h = torch.bmm(v.reshape(B, self.C, H * W), w.permute(0, 2, 1))  # (B, C, HW_q)
        return x + self.proj_out(h.reshape(B, self.C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # zero-pad right and bottom, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` / ``attn`` lists, plus ``downsample`` or ``upsample`` (checkpoint names)."""

    def __init__(self, channels_in: int, channels_out: int, n_blocks: int, with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(channels_in, channels_out))
            channels_in = channels_out
            if with_attn:
                self.attn.append(AttnBlock(channels_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Mid(nn.Module):
    def __init__(self, channels: int, with_attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if with_attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i in range(n):
            level = Level(c_in, widths[i], cfg.num_res_blocks, with_attn=cfg.using_sa and i == n - 1)
            if i != n - 1:
                level.downsample = Downsample(widths[i])
            self.down.append(level)
            c_in = widths[i]
        self.mid = Mid(c_in, cfg.using_mid_sa)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            downsample = getattr(level, "downsample", None)  # every level but the coarsest
            if downsample is not None:
                h = downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = Mid(c_in, cfg.using_mid_sa)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):  # built coarse to fine, stored indexed by resolution level
            level = Level(c_in, widths[i], cfg.num_res_blocks + 1, with_attn=cfg.using_sa and i == n - 1)
            if i != 0:
                level.upsample = Upsample(widths[i])
            levels.insert(0, level)
            c_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            upsample = getattr(level, "upsample", None)  # every level but the finest
            if upsample is not None:
                h = upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual refinement of an upsampled code map: (1 - r) * h + r * conv(h)."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.resi_ratio = abs(resi_ratio)

    batch_invariant = False  # set with amskv.model.invariance_probe.apply_forms

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        conv = super().forward
        refined = in_fixed_batches(conv, h) if self.batch_invariant else conv(h)
        return h.mul(1 - self.resi_ratio) + refined.mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)


def phi_index_per_scale(num_phis: int, num_scales: int) -> list[int]:
    """Which Phi serves each scale: the nearest tick to si/(S-1), computed in float64 like the original.

    For 4 Phis and 10 scales this is [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]; scales 2 and 7 are exact ties that
    float64 rounding resolves upwards, so the table must not be recomputed with another tie rule.
    """
    K = num_phis
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


class VectorQuantizer2(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums = tuple(cfg.patch_nums)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(cfg.ema_rows, cfg.vocab_size))  # training statistic
        self.quant_resi = PhiPartiallyShared([Phi(cfg.z_channels, cfg.quant_resi) for _ in range(cfg.share_quant_resi)])
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.phi_index = phi_index_per_scale(cfg.share_quant_resi, len(self.patch_nums))
        # the more_smooth path's soft codes (weights @ codebook): fixed tiles unless the engine chose a form
        self.codebook_gemm: GemmForm = TILES

    def phi(self, si: int) -> Phi:
        return cast(Phi, self.quant_resi.qresi_ls[self.phi_index[si]])

    def code_map(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)  # (B, pn*pn, Cv) -> (B, Cv, pn, pn)

    def add_scale(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """f_hat += Phi_si(upsampled h), in place; the last scale is added without resampling."""
        full = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(full, full), mode="bicubic")
        return f_hat.add_(self.phi(si)(h_BChw))

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """Adds scale si to f_hat (in place) and returns f_hat area-downsampled to the next scale."""
        self.add_scale(si, f_hat, h_BChw)
        if si == len(self.patch_nums) - 1:
            return f_hat
        pn_next = self.patch_nums[si + 1]
        return F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")

    def idx_to_fhat(self, idx_list: list[torch.Tensor], cumulative: bool = False):
        B, full = idx_list[0].shape[0], self.patch_nums[-1]
        f_hat = idx_list[0].new_zeros(B, self.Cvae, full, full, dtype=torch.float32)
        steps = []
        for si, pn in enumerate(self.patch_nums):
            self.add_scale(si, f_hat, self.code_map(idx_list[si], pn))
            if cumulative:
                steps.append(f_hat.clone())
        return steps if cumulative else f_hat

    def idx_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - 1, Cvae): f_hat after scales 0..si, area-pooled to scale si+1."""
        B, full = idx_list[0].shape[0], self.patch_nums[-1]
        f_hat = idx_list[0].new_zeros(B, self.Cvae, full, full, dtype=torch.float32)
        pieces = []
        for si in range(len(self.patch_nums) - 1):
            nxt = self.next_autoregressive_input(si, f_hat, self.code_map(idx_list[si], self.patch_nums[si]))
            pieces.append(nxt.view(B, self.Cvae, -1).transpose(1, 2))  # (B, Cv, pn', pn') -> (B, pn'^2, Cv)
        return torch.cat(pieces, dim=1)

    def f_to_idx(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Residual multi-scale quantisation: one (B, pn*pn) index map per scale (squared-L2 nearest code)."""
        B, C, H, W = f_BChw.shape
        f_rest, f_hat = f_BChw.detach().clone(), torch.zeros_like(f_BChw)
        codes = self.embedding.weight.data  # (V, Cv)
        out = []
        for si, pn in enumerate(self.patch_nums):
            last = si == len(self.patch_nums) - 1
            z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B, C, pn, pn) -> (B*pn*pn, C)
            d = z.square().sum(1, keepdim=True) + codes.square().sum(1)  # (N, V): |z|^2 + |e|^2 ...
            d.addmm_(z, codes.T, alpha=-2, beta=1)  # ... - 2 z.e
            idx = d.argmin(1).view(B, pn * pn)
            h = self.code_map(idx, pn)
            if not last:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.phi(si)(h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(idx)
        return out


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer2(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """img in [-1, 1] -> continuous latent f (B, Cv, h, w)."""
        return self.quant_conv(self.encoder(img))

    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idx(self.encode(img))

    def fhat_to_img(self, f_hat: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        img = self.decoder(self.post_quant_conv(f_hat))
        return img.clamp(-1, 1) if clamp else img

    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))
