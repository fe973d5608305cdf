"""The VAR transformer (next-scale prediction), checkpoint-compatible with FoundationVision/VAR.

Module and parameter names equal the keys of the released ``var_d*.pth`` files, so
``load_state_dict(strict=True)`` works on them, derived buffers included. Attention never
concatenates K/V itself: at inference it asks its layer's KV cache object (``amskv.kvcache``).
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from amskv.config import VARConfig
from amskv.model.invariant import Linear

# ln(100) rounded to float32, as the original computes it with torch.log(torch.tensor(100)).item().
MAX_SCALE_MUL = 4.605170249938965


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    zero_k_bias: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C, H = cfg.embed_dim, cfg.num_heads
        self.num_heads, self.head_dim, self.l2_norm = H, C // H, cfg.attn_l2_norm
        if self.l2_norm:
            # per-head log temperature; the softmax scale is then 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), 4.0).log())
            self.scale = 1.0
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # K has no bias; kept because checkpoints carry it
        self.proj = Linear(C, C)

    def forward(self, x: torch.Tensor, mask: BlockCausal | None = None, kv=None) -> torch.Tensor:
        """``mask``: teacher forcing's block-causal attention; None when generating (the current scale attends
        to itself and, through ``kv``, to the kept scales: nothing to mask)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))  # parameters, not K/V
        # mat_qkv's own GEMM form (amskv.model.invariant), with the q/v bias it lacks as a module
        qkv = self.mat_qkv.gemm.linear(x, self.mat_qkv.weight, bias)
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)  # (B, L, 3C) -> (B, L, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if kv is not None:
            k, v = kv.attend(q, k, v)  # (B, H, kept + L, hd) views into preallocated storage
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = mask.attend(q, k, v, self.scale)
        if kv is not None:
            kv.commit()  # the policy decides what this layer keeps; storage compacts
        return self.proj(out.transpose(1, 2).reshape(B, L, C))  # (B, H, L, hd) -> (B, L, C)


    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Rows at different scales in one call: x is (T, C), every group's tokens back to back.

        The dense parts (qkv, proj) run on all T tokens at once; attention runs per group, each group's rows
        against that group's own KV cache (``packing.kv[g]``, this layer's ``LayerKV``)."""
        T, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = self.mat_qkv.gemm.linear(x, self.mat_qkv.weight, bias)  # (T, 3C)
        out = qkv.new_empty(T, C)
        for (t0, rows, length), kv in zip(packing.spans, packing.layer_kv, strict=True):
            part = qkv[t0:t0 + rows * length].view(rows, length, 3, self.num_heads, self.head_dim)  # (R, L, 3, H, hd)
            q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)  # each (R, H, L, hd)
            if self.l2_norm:
                scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
                q = F.normalize(q, dim=-1).mul(scale_mul)
                k = F.normalize(k, dim=-1)
            k, v = kv.attend(q, k, v)  # (R, H, kept + L, hd)
            o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            kv.commit()
            out[t0:t0 + rows * length] = o.transpose(1, 2).reshape(rows * length, C)  # (R, H, L, hd) -> (R*L, C)
        return self.proj(out)


class AdaLNSelfAttn(nn.Module):
    """One block: AdaLN-modulated attention and FFN, gated residuals."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.shared_aln = C, cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        self.attn = SelfAttention(cfg)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if not cfg.shared_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 6 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: BlockCausal | None = None, kv=None) -> torch.Tensor:
        # cond: (B, C) class condition, or (B, 1, 6, C) from shared_ada_lin when AdaLN is shared
        if self.shared_aln:
            mods = self.ada_gss + cond
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C)  # (B, 6C) -> (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)  # each (B, 1, C)
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.attn(h, mask, kv).mul_(gamma1)
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        return x + self.ffn(h).mul(gamma2)

    def forward_packed(self, x: torch.Tensor, cond: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: (T, C) packed tokens; cond: per sequence row, (R, C) or (R, 1, 6, C) when AdaLN is shared."""
        if self.shared_aln:
            mods = self.ada_gss + cond  # (R, 1, 6, C)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C)  # (R, 6C) -> (R, 1, 6, C)
        # (R, 1, 6, C) -> (R, 6, C) -> (T, 6, C): each token takes its row's modulation
        mods = mods.view(-1, 6, self.C).index_select(0, packing.token_row)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(1)  # each (T, C)
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.attn.forward_packed(h, packing).mul_(gamma1)
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        return x + self.ffn(h).mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.C = cfg.embed_dim
        self.ln_wo_grad = nn.LayerNorm(self.C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), Linear(self.C, 2 * self.C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, token_row: torch.Tensor | None = None) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)  # (B, 2C) -> 2 x (B, 1, C)
        if token_row is not None:  # packed tokens (T, C): each token takes its row's modulation
            scale, shift = scale.squeeze(1).index_select(0, token_row), shift.squeeze(1).index_select(0, token_row)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


def level_layout(patch_nums: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale index of every token (1, L) and the block-causal additive mask (1, 1, L, L)."""
    lvl = torch.cat([torch.full((pn * pn,), si) for si, pn in enumerate(patch_nums)])  # (L,)
    L = lvl.numel()
    bias = torch.where(lvl.view(L, 1) >= lvl.view(1, L), 0.0, -torch.inf)  # key level <= query level
    return lvl.view(1, L), bias.view(1, 1, L, L)


class BlockCausal:
    """Block-causal attention computed per group of query scales, each over its key prefix without a mask.

    Equal to SDPA under ``level_layout``'s mask (to rounding), but the large late scales skip the masked
    ~40 % of the L x L scores: one masked call for the small early scales, then one unmasked call per late
    scale (``VAR.forward(..., split_attention=True)``, used by training; 680 tokens, docs/demo-model.md).
    """

    def __init__(self, patch_nums: tuple[int, ...], additive_mask: torch.Tensor, masked_tokens: int = 160):
        begin_ends, cur = [], 0
        for pn in patch_nums:
            begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        first = max([i for i, (_, end) in enumerate(begin_ends) if end <= masked_tokens], default=0)
        head_end = begin_ends[first][1]
        self.mask = additive_mask[:, :, :head_end, :head_end]  # (1, 1, T, T) for the early scales
        self.groups = [(0, head_end)] + [be for be in begin_ends[first + 1:]]  # (query begin, query end = key end)

    def to(self, dtype: torch.dtype) -> BlockCausal:
        self.mask = self.mask.to(dtype)
        return self

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        outs = []
        for i, (begin, end) in enumerate(self.groups):
            outs.append(F.scaled_dot_product_attention(q[:, :, begin:end], k[:, :, :end], v[:, :, :end],
                                                       attn_mask=self.mask if i == 0 else None, scale=scale))
        return torch.cat(outs, dim=2)  # (B, H, L, hd)


class Packing:
    """How a step's sequence rows lie in one packed (T, C) tensor, and each group's KV for the current layer.

    ``spans[g] = (first token, rows, tokens per row)``: group g's rows all sit at one scale, back to back.
    ``token_row`` (T,) int64: the sequence row of every token, for per-row modulation. ``kv[g]`` is group g's
    cache (indexable by layer); ``layer_kv`` is set by ``VAR.run_packed`` to the current layer's entries.
    """

    def __init__(self, spans: list[tuple[int, int, int]], kv: list, device):
        self.spans, self.kv = spans, kv
        lengths = torch.tensor([length for _, rows, length in spans for _ in range(rows)], dtype=torch.int64)
        self.token_row = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)  # (T,)
        self.layer_kv: list = []


class VAR(nn.Module):
    lvl_1L: torch.Tensor  # buffers (register_buffer below)
    attn_bias_for_masking: torch.Tensor

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.config = cfg
        C, L = cfg.embed_dim, cfg.seq_len
        std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, C), std=std))
        self.pos_1LC = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, L, C), std=std))
        lvl_1L, attn_bias = level_layout(cfg.patch_nums)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", attn_bias.contiguous())
        self.word_embed = Linear(cfg.cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class used by CFG
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), Linear(C, 6 * C))
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = Linear(C, cfg.vocab_size)

    @property
    def block_list(self) -> list[AdaLNSelfAttn]:
        """The blocks, typed (a ModuleList's items are plain Modules to the type checker)."""
        return cast("list[AdaLNSelfAttn]", list(self.blocks))

    @property
    def blocks_dtype(self) -> torch.dtype:
        """The dtype the transformer blocks run in (the KV cache's too); embeddings and the head stay fp32."""
        return self.block_list[0].attn.mat_qkv.weight.dtype

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def block_condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What every block receives: the class embedding, or its shared AdaLN projection."""
        if self.config.shared_aln:
            return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)  # (B, 6C) -> (B, 1, 6, C)
        return cond_BD

    def lvl_pos(self) -> torch.Tensor:
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC  # (1, L, C)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD.float()).float()).float()

    def run_blocks(self, x: torch.Tensor, cond_BD: torch.Tensor, mask: BlockCausal | None = None,
                   kv_layers=None) -> torch.Tensor:
        """All blocks, in the blocks' dtype; returns fp32 hidden states."""
        dtype = self.blocks_dtype
        cond = self.block_condition(cond_BD.to(dtype))
        x = x.to(dtype)
        if mask is not None:
            mask = mask.to(dtype)
        for i, block in enumerate(self.block_list):
            x = block(x, cond, mask, None if kv_layers is None else kv_layers[i])
        return x.float()

    def run_packed(self, x: torch.Tensor, cond_rows: torch.Tensor, packing: Packing) -> torch.Tensor:
        """All blocks over packed tokens x (T, C) of rows at different scales (``Packing``); fp32 out."""
        dtype = self.blocks_dtype
        cond = self.block_condition(cond_rows.to(dtype))
        x = x.to(dtype)
        for i, block in enumerate(self.block_list):
            packing.layer_kv = [kv[i] for kv in packing.kv]
            x = block.forward_packed(x, cond, packing)
        return x.float()

    def logits_packed(self, h: torch.Tensor, cond_rows: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The head over packed hidden states h (T, C): logits (T, V), fp32."""
        return self.head(self.head_nm(h.float(), cond_rows.float(), packing.token_row).float()).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                split_attention: bool = False) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) for all scales at once under the block-causal mask.

        Unlike the original, no label dropout happens here; training code drops labels itself.
        ``split_attention``: the same attention per group of scales (:class:`BlockCausal`), cheaper at 680 tokens.
        """
        B, L = label_B.shape[0], self.config.seq_len
        cond_BD = self.class_emb(label_B)  # (B, C)
        sos = cond_BD.unsqueeze(1) + self.pos_start.expand(B, 1, -1)  # (B, 1, C)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1) + self.lvl_pos()  # (B, L, C)
        mask = self.attn_bias_for_masking[:, :, :L, :L]
        # one masked SDPA over all L tokens, or the split form (the same scores, to rounding)
        attention = BlockCausal(self.config.patch_nums, mask, masked_tokens=160 if split_attention else L)
        h = self.run_blocks(x, cond_BD, attention)
        return self.get_logits(h, cond_BD)
