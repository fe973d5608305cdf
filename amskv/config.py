"""Frozen model configurations with named presets.

The released VAR checkpoints follow one rule: ``heads = depth`` and ``width = 64 * depth``.
``demo`` is the small MNIST model that ships inside the package; ``mnist64`` is its 64x64 sibling on the released
256-px scale layout (16x16 latent, 680 tokens), see docs/demo-model.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
# The most images one engine call or step may hold, whatever the memory allows: the released models' largest
# batch. Settings, the KV manager and the capacity formula all use this one value.
MAX_IMAGES = 256

PATCH_NUMS_DEMO = (1, 2, 3, 4, 5, 6, 8)
PATCH_NUMS_MNIST64 = PATCH_NUMS_256  # the released layout: 680 tokens on a 16x16 latent


@dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32  # latent channels fed to word_embed
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    shared_aln: bool = False
    attn_l2_norm: bool = True
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def scale_tokens(self) -> tuple[int, ...]:
        return tuple(pn * pn for pn in self.patch_nums)

    @property
    def seq_len(self) -> int:
        return sum(self.scale_tokens)

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, cur = [], 0
        for t in self.scale_tokens:
            out.append((cur, cur + t))
            cur += t
        return tuple(out)


def released_var(depth: int, *, shared_aln: bool = False, patch_nums=PATCH_NUMS_256) -> VARConfig:
    return VARConfig(depth=depth, embed_dim=64 * depth, num_heads=depth, shared_aln=shared_aln,
                     patch_nums=tuple(patch_nums))


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder blocks per level; the decoder uses one more
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    ema_rows: int = 10  # rows of the (unused) quantize.ema_vocab_hit_SV training statistic

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * self.downsample


@dataclass(frozen=True)
class ModelPreset:
    name: str
    var: VARConfig
    vae: VQVAEConfig = field(default_factory=VQVAEConfig)


VAR_PRESETS: dict[str, ModelPreset] = {
    "d16": ModelPreset("var-d16", released_var(16)),
    "d20": ModelPreset("var-d20", released_var(20)),
    "d24": ModelPreset("var-d24", released_var(24)),
    "d30": ModelPreset("var-d30", released_var(30)),
    "d36": ModelPreset("var-d36", released_var(36, shared_aln=True, patch_nums=PATCH_NUMS_512),
                       VQVAEConfig(patch_nums=PATCH_NUMS_512)),
    "demo": ModelPreset(
        "demo-mnist",
        VARConfig(depth=4, embed_dim=128, num_heads=4, num_classes=10, vocab_size=512, cvae=16,
                  patch_nums=PATCH_NUMS_DEMO),
        VQVAEConfig(vocab_size=512, z_channels=16, ch=8, ch_mult=(1, 2, 8), num_res_blocks=1, in_channels=1,
                    using_sa=False, using_mid_sa=False, patch_nums=PATCH_NUMS_DEMO, ema_rows=len(PATCH_NUMS_DEMO)),
    ),
    # 64x64 MNIST on the 256-px scale layout; six layers so that layer-wise KV behaviour means something.
    "mnist64": ModelPreset(
        "mnist64",
        VARConfig(depth=6, embed_dim=128, num_heads=4, num_classes=10, vocab_size=512, cvae=16,
                  patch_nums=PATCH_NUMS_MNIST64),
        VQVAEConfig(vocab_size=512, z_channels=16, ch=8, ch_mult=(1, 2, 8), num_res_blocks=1, in_channels=1,
                    using_sa=False, using_mid_sa=False, patch_nums=PATCH_NUMS_MNIST64,
                    ema_rows=len(PATCH_NUMS_MNIST64)),
    ),
}

# The small MNIST models that `amskv train-demo` trains and that ship inside the package (amskv/weights/
# <name>_var.pth, <name>_vae.pth, <name>_profile.json); `--model NAME` / AMSKV_MODEL select one.
BUNDLED_MODELS = ("demo", "mnist64")
