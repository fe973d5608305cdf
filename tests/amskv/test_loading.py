"""Strict loading: the architecture is inferred, and a bad file fails with one clear error naming the keys."""
import pytest
import torch

from amskv.config import PATCH_NUMS_512, VAR_PRESETS, released_var
from amskv.model.loading import (CheckpointError, build_var, check_pair, infer_var_config, infer_vqvae_config,
                                 load_pair, load_var, read_state_dict)
from amskv.model.var import VAR, level_layout


def test_infers_golden_architecture(golden_dir):
    var, vae = load_pair(golden_dir / "tiny_var.pth", golden_dir / "vae.pth")
    c = var.config
    assert (c.depth, c.embed_dim, c.num_heads, c.num_classes, c.vocab_size, c.cvae) == (2, 128, 2, 1000, 4096, 32)
    assert c.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and not c.shared_aln
    v = vae.config
    assert (v.ch, v.ch_mult, v.num_res_blocks, v.vocab_size, v.z_channels, v.share_quant_resi) == \
        (32, (1, 1, 2, 2, 4), 2, 4096, 32, 4)
    assert vae.config.resolution == 256
    assert not any(p.requires_grad for p in var.parameters())


@pytest.mark.parametrize("preset", ["d16", "d36"])
def test_infers_released_layouts_from_key_shapes(preset):
    cfg = VAR_PRESETS[preset].var
    with torch.device("meta"):
        sd = dict(VAR(cfg).state_dict())  # shapes only
    sd["lvl_1L"] = level_layout(cfg.patch_nums)[0]  # the one entry the loader reads values from
    inferred = infer_var_config(sd)
    assert inferred == cfg
    n_keys = 12 + 13 * cfg.depth if not cfg.shared_aln else 14 + 12 * cfg.depth
    assert len(sd) == n_keys


def test_shared_adaln_round_trip_and_512_scales():
    cfg = released_var(2, shared_aln=True, patch_nums=PATCH_NUMS_512)
    sd = VAR(cfg).state_dict()
    assert "shared_ada_lin.1.weight" in sd and "blocks.0.ada_gss" in sd and "blocks.0.ada_lin.1.weight" not in sd
    model = build_var(sd)
    assert model.config.shared_aln and model.config.patch_nums == PATCH_NUMS_512
    # derived buffers may be absent: rebuilt from the config
    slim = {k: v for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    assert torch.equal(build_var(slim).attn_bias_for_masking, sd["attn_bias_for_masking"])


def test_missing_and_unexpected_keys_are_named(golden_dir, tmp_path):
    sd = dict(read_state_dict(golden_dir / "tiny_var.pth"))
    del sd["blocks.1.ffn.fc2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_var(path)
    msg = str(err.value)
    assert "missing keys" in msg and "blocks.1.ffn.fc2.bias" in msg
    assert "unexpected keys" in msg and "blocks.1.extra.weight" in msg


def test_mis_shaped_key_is_named(golden_dir, tmp_path):
    sd = dict(read_state_dict(golden_dir / "tiny_var.pth"))
    sd["blocks.0.attn.proj.weight"] = torch.zeros(128, 64)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*blocks\.0\.attn\.proj\.weight"):
        load_var(path)


def test_truncated_and_wrong_files(golden_dir, tmp_path):
    data = (golden_dir / "tiny_var.pth").read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_var(trunc)
    with pytest.raises(CheckpointError, match="not a VAR checkpoint"):
        load_var(golden_dir / "vae.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_var(tmp_path / "nope.pth")


def test_vae_that_does_not_fit_the_var(golden_dir):
    var, vae = load_pair(golden_dir / "tiny_var.pth", golden_dir / "vae.pth")
    cfg = infer_vqvae_config(read_state_dict(golden_dir / "vae.pth"))
    assert cfg.vocab_size == var.config.vocab_size
    var.config = released_var(2).__class__(**{**var.config.__dict__, "vocab_size": 512})
    with pytest.raises(CheckpointError, match="does not fit"):
        check_pair(var, vae)


def test_safetensors_loads_the_same(golden_dir, tmp_path):
    from safetensors.torch import save_file

    sd = read_state_dict(golden_dir / "tiny_var.pth")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    a, b = load_var(golden_dir / "tiny_var.pth"), load_var(path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_loading_assigns_the_read_tensors_without_copies(golden_dir):
    sd = read_state_dict(golden_dir / "tiny_var.pth")  # memory-mapped for .pth files
    model = build_var(sd)
    for name in ("pos_1LC", "blocks.0.attn.mat_qkv.weight", "head.weight"):
        assert model.state_dict()[name].data_ptr() == sd[name].data_ptr()
