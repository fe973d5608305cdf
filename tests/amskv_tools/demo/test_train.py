"""Demo training: tiny real runs of every stage (a few steps on a few hundred images), resume, and the shipped files."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from amskv_tools.cli import main as cli_main
from amskv.config import VAR_PRESETS
from amskv_tools.demo.train_var import (VARTrainConfig, build_var, drop_labels, load_tokens, lr_at, save_tokens,
                                  tokenize, train_var)
from amskv_tools.demo.train_vqvae import (VQVAETrainConfig, batch_indices, build_vqvae, quantize_for_training,
                                    restart_dead_codes, train_vqvae)
from amskv.engine import bundled_checkpoints
from amskv.model.loading import infer_var_config, infer_vqvae_config, load_pair, load_vqvae, read_state_dict
from tests.tools import require_mnist

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

DEMO = VAR_PRESETS["demo"]
TINY_VQVAE = VQVAETrainConfig(steps=30, batch_size=16, warmup_steps=3, restart_every=10, checkpoint_every=10)
TINY_VAR = VARTrainConfig(steps=30, batch_size=16, warmup_steps=3, checkpoint_every=10)


def digits(n: int = 256, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic digit-like images: a bright bar whose position encodes the label (N, 1, size, size) in [-1, 1].

    ``size`` is 32 (the demo) or 64 (mnist64); the bar scales with it.
    """
    s = size // 32
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = torch.full((n, 1, size, size), -1.0)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, s * (4 + 2 * label):s * (7 + 2 * label), 6 * s:26 * s] = 1.0  # a 3s-px bar, rows set by the label
    return images + 0.05 * torch.randn(images.shape, generator=gen), labels


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    images, labels = digits()
    out = tmp_path_factory.mktemp("vqvae")
    result = train_vqvae(DEMO.vae, images, out, TINY_VQVAE, progress=False)
    return result, out, images, labels


def test_differentiable_quantiser_matches_the_inference_one():
    vae = build_vqvae(DEMO.vae, seed=1)
    with torch.no_grad():
        vae.quantize.embedding.weight.normal_()  # spread codes so many different indices occur
    f = torch.randn(4, 16, 8, 8, requires_grad=True)
    f_hat, vq_loss, idx = quantize_for_training(vae.quantize, f, commitment=0.25)
    expected = vae.quantize.f_to_idx(f.detach())
    assert all(torch.equal(a, b) for a, b in zip(idx, expected))
    # same codes, two float32 paths (straight-through sum vs upsample-and-add): ~10 ulps of values of order 1-5
    torch.testing.assert_close(f_hat.detach(), vae.quantize.idx_to_fhat(expected), atol=1e-5, rtol=1e-5)
    (f_hat.sum() + vq_loss).backward()  # straight-through: the encoder side receives gradients
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad is not None and vae.quantize.embedding.weight.grad.abs().sum() > 0


def test_dead_code_restart_replaces_only_unused_codes():
    vae = build_vqvae(DEMO.vae, seed=0)
    before = vae.quantize.embedding.weight.detach().clone()
    hits = torch.ones(DEMO.vae.vocab_size, dtype=torch.int64)
    hits[[3, 7]] = 0
    f = torch.randn(2, 16, 8, 8)
    restarted = restart_dead_codes(vae.quantize, hits, f, 0.3, torch.Generator().manual_seed(0))
    after = vae.quantize.embedding.weight.detach()
    assert restarted == 2
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7]
    features = 0.3 * f.permute(0, 2, 3, 1).reshape(-1, 16)
    # the restart copies 0.3 * f rows (one elementwise rounding); allclose's default rtol 1e-5 only forgives that
    assert all(any(torch.allclose(after[i], row, rtol=1e-5, atol=1e-8) for row in features) for i in (3, 7))


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step():
    rows = torch.cat([batch_indices(s, 100, 10, seed=3) for s in range(10)])
    assert sorted(rows.tolist()) == list(range(100))
    assert torch.equal(batch_indices(4, 100, 10, seed=3), batch_indices(4, 100, 10, seed=3))
    assert not torch.equal(batch_indices(10, 100, 10, seed=3), batch_indices(0, 100, 10, seed=3))


def test_vqvae_stage_learns_and_saves_a_loadable_state_dict(trained_vae):
    result, out, images, _ = trained_vae
    assert result.finished and result.steps_done == TINY_VQVAE.steps
    history = result.recon_history
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5
    sd = read_state_dict(result.weights_path)
    assert "quantize.ema_vocab_hit_SV" in sd and sd["quantize.ema_vocab_hit_SV"].shape == (7, 512)
    assert infer_vqvae_config(sd, DEMO.var.patch_nums) == DEMO.vae  # the loader infers exactly the preset
    vae = load_vqvae(result.weights_path, DEMO.var.patch_nums)
    assert vae.idx_to_img(vae.img_to_idx(images[:4])).shape == (4, 1, 32, 32)


def test_vqvae_resume_continues_identically(tmp_path):
    images, _ = digits(128)
    cfg = replace(TINY_VQVAE, steps=12, restart_every=4, checkpoint_every=4)
    whole = train_vqvae(DEMO.vae, images, tmp_path / "whole", cfg, progress=False)
    first = train_vqvae(DEMO.vae, images, tmp_path / "split", cfg, progress=False, max_new_steps=6)
    assert not first.finished and first.steps_done == 6
    rest = train_vqvae(DEMO.vae, images, tmp_path / "split", cfg, resume=True, progress=False)
    assert rest.finished and rest.steps_done == 12
    a, b = read_state_dict(whole.weights_path), read_state_dict(rest.weights_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.recon_history == whole.recon_history


def test_tokens_round_trip_and_feed_the_var(trained_vae, tmp_path):
    _, out, images, labels = trained_vae
    vae = load_vqvae(out / "demo_vae.pth", DEMO.var.patch_nums)
    tokens = tokenize(vae, images[:32], labels[:32], batch_size=16, progress=False)
    L = DEMO.var.seq_len
    assert tokens.indices.shape == (32, L) and tokens.var_input.shape == (32, L - 1, 16)
    idx_list = list(tokens.indices.long().split(list(DEMO.var.scale_tokens), dim=1))
    torch.testing.assert_close(tokens.var_input.float(), vae.quantize.idx_to_var_input(idx_list),
                               atol=2e-3, rtol=2e-3)  # stored as float16
    save_tokens(tokens, tmp_path / "tokens.pt")
    again = load_tokens(tmp_path / "tokens.pt")
    assert torch.equal(again.indices, tokens.indices) and torch.equal(again.labels, tokens.labels)


def test_var_stage_learns_and_the_pair_loads(trained_vae, tmp_path):
    _, out, images, labels = trained_vae
    vae = load_vqvae(out / "demo_vae.pth", DEMO.var.patch_nums)
    tokens = tokenize(vae, images, labels, progress=False)
    result = train_var(DEMO.var, tokens, tmp_path, TINY_VAR, progress=False)
    assert result.finished and len(result.loss_history) == TINY_VAR.steps
    assert sum(result.loss_history[-5:]) / 5 < sum(result.loss_history[:5]) / 5 - 1.0
    var, vae2 = load_pair(result.weights_path, out / "demo_vae.pth")
    assert infer_var_config(read_state_dict(result.weights_path)) == DEMO.var
    assert var.config == DEMO.var and vae2.config == DEMO.vae


def test_var_resume_continues_identically(trained_vae, tmp_path):
    _, out, images, labels = trained_vae
    tokens = tokenize(load_vqvae(out / "demo_vae.pth", DEMO.var.patch_nums), images[:64], labels[:64],
                      progress=False)
    cfg = replace(TINY_VAR, steps=8, checkpoint_every=4)
    whole = train_var(DEMO.var, tokens, tmp_path / "whole", cfg, progress=False)
    train_var(DEMO.var, tokens, tmp_path / "split", cfg, progress=False, max_new_steps=4)
    rest = train_var(DEMO.var, tokens, tmp_path / "split", cfg, resume=True, progress=False)
    a, b = read_state_dict(whole.weights_path), read_state_dict(rest.weights_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest.loss_history == whole.loss_history


def test_var_wall_clock_schedule_ends_on_time(trained_vae, tmp_path):
    _, out, images, labels = trained_vae
    tokens = tokenize(load_vqvae(out / "demo_vae.pth", DEMO.var.patch_nums), images[:64], labels[:64],
                      progress=False)
    cfg = replace(TINY_VAR, steps=10**9, time_budget_minutes=0.05)  # 3 s, however many steps fit
    result = train_var(DEMO.var, tokens, tmp_path, cfg, progress=False)
    assert result.finished and result.steps_done >= 1 and result.steps_done == len(result.loss_history)
    assert lr_at(500, cfg, time_fraction=1.0) == 0.0
    assert lr_at(500, cfg, time_fraction=0.0) == cfg.lr
    assert lr_at(0, cfg, time_fraction=0.0) == cfg.lr / cfg.warmup_steps


def test_var_init_starts_blocks_near_identity_and_drops_labels():
    var = build_var(DEMO.var, TINY_VAR)
    C = DEMO.var.embed_dim
    gammas = var.blocks[0].ada_lin[1].weight[:2 * C]
    assert gammas.abs().max() < 1e-4
    labels = torch.arange(10).repeat(100)
    dropped = drop_labels(labels, null_class=10, rate=0.1, seed=0, step=5)
    share = (dropped == 10).float().mean().item()
    assert 0.05 < share < 0.15
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


def test_cli_refuses_a_stage_without_its_input(tmp_path, capsys):
    assert cli_main(["train-demo", "var", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "tokens.pt" in capsys.readouterr().out


def test_shipped_demo_weights_match_the_demo_preset():
    var_path, vae_path = bundled_checkpoints()
    var, vae = load_pair(var_path, vae_path)
    assert var.config == DEMO.var and vae.config == DEMO.vae
    total = var_path.stat().st_size + vae_path.stat().st_size
    assert total <= 20 * 1024 * 1024


def test_cli_all_stages_on_real_mnist(tmp_path, capsys):
    require_mnist()
    args = ["train-demo", "all", "--out", str(tmp_path), "--limit", "256", "--vqvae-steps", "20", "--var-steps", "10",
            "--batch-size", "16", "--checkpoint-every", "10", "--no-progress"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert '"stage": "vqvae"' in printed and '"stage": "var"' in printed
    var, vae = load_pair(tmp_path / "demo_var.pth", tmp_path / "demo_vae.pth")
    assert var.config == DEMO.var and vae.config == DEMO.vae
