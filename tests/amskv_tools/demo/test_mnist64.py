"""mnist64, the 64x64 MNIST model on the released 256-px scale layout: presets, tiny real training runs of every
stage at 64x64, resume, the split block-causal attention, and selection by name in the CLI and the settings."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from amskv_tools.cli import main as cli_main
from amskv.config import BUNDLED_MODELS, PATCH_NUMS_256, VAR_PRESETS
from amskv_tools.demo.quality import evaluate, for_classifier
from amskv_tools.demo.train_var import VARTrainConfig, tokenize, train_var
from amskv_tools.demo.train_vqvae import VQVAETrainConfig, train_vqvae
from amskv.engine import Engine, _weights_dir, bundled_files
from amskv.model.loading import infer_var_config, infer_vqvae_config, load_pair, load_vqvae, read_state_dict
from amskv.model.var import VAR
from amskv.sampling import SamplingParams
from server.settings import Settings, describe_validation_error
from tests.amskv_tools.demo.test_train import digits
from tests.tools import require_mnist

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

MNIST64 = VAR_PRESETS["mnist64"]
TINY_VQVAE = VQVAETrainConfig(steps=8, batch_size=8, warmup_steps=2, restart_every=4, checkpoint_every=4)
TINY_VAR = VARTrainConfig(steps=6, batch_size=4, warmup_steps=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A VQVAE and a VAR of the mnist64 shapes, each trained a few steps on synthetic 64x64 images."""
    images, labels = digits(64, size=64)
    out = tmp_path_factory.mktemp("mnist64")
    vae_result = train_vqvae(MNIST64.vae, images, out, TINY_VQVAE, progress=False, weights_name="mnist64_vae.pth")
    vae = load_vqvae(out / "mnist64_vae.pth", MNIST64.var.patch_nums)
    tokens = tokenize(vae, images, labels, batch_size=32, progress=False)
    var_result = train_var(MNIST64.var, tokens, out, TINY_VAR, progress=False, weights_name="mnist64_var.pth")
    return out, vae_result, var_result, tokens


def test_presets_are_the_released_256_px_layout_on_a_16x16_latent():
    var, vae = MNIST64.var, MNIST64.vae
    assert var.patch_nums == PATCH_NUMS_256 == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert var.seq_len == 680 and var.depth >= 6
    assert vae.patch_nums == var.patch_nums and vae.patch_nums[-1] == 16
    assert vae.resolution == 64 and vae.downsample == 4 and vae.in_channels == 1
    assert (var.num_classes, var.vocab_size, var.cvae) == (10, vae.vocab_size, vae.z_channels)
    assert set(BUNDLED_MODELS) == {"demo", "mnist64"}
    assert Settings.model_fields["model"].annotation.__args__[0].__args__ == BUNDLED_MODELS


def test_split_attention_equals_the_masked_teacher_forcing():
    torch.manual_seed(0)
    var = VAR(MNIST64.var)
    with torch.no_grad():
        for p in var.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the near-zero init, so attention matters
        labels, inputs = torch.tensor([3, 10]), torch.randn(2, 679, 16)
        masked, split = var(labels, inputs), var(labels, inputs, split_attention=True)
    # the two paths sum attention in different orders (per-scale blocks vs one masked softmax): logits reach ~5
    # (float32 ulp 4.8e-7) and differ by ~2e-6 here; 1e-4 + 1e-4 relative is ~100 ulps, room for other CPUs' kernels
    torch.testing.assert_close(split, masked, atol=1e-4, rtol=1e-4)
    assert (masked[:, 155:] - var(labels, inputs * 0.5)[:, 155:]).abs().max() > 1e-3  # the inputs do matter


def test_every_stage_trains_at_64x64_and_the_pair_loads(tiny_pair):
    out, vae_result, var_result, tokens = tiny_pair
    assert vae_result.finished and var_result.finished
    assert sum(vae_result.recon_history[-2:]) < sum(vae_result.recon_history[:2])
    assert var_result.loss_history[-1] < var_result.loss_history[0]
    assert tokens.indices.shape == (64, 680) and tokens.var_input.shape == (64, 679, 16)
    assert infer_vqvae_config(read_state_dict(out / "mnist64_vae.pth"), PATCH_NUMS_256) == MNIST64.vae
    assert infer_var_config(read_state_dict(out / "mnist64_var.pth")) == MNIST64.var
    var, vae = load_pair(out / "mnist64_var.pth", out / "mnist64_vae.pth")
    assert var.config == MNIST64.var and vae.config == MNIST64.vae


def test_the_engine_generates_64x64_images_and_eval_quality_judges_them(tiny_pair):
    out = tiny_pair[0]
    engine = Engine.load(out / "mnist64_var.pth", out / "mnist64_vae.pth", policy="full")
    assert engine.model_name == "mnist64" and engine.resolution == 64
    result = engine.generate([1, 7], [0, 1], SamplingParams(cfg=1.0, top_k=0, top_p=0.0))
    assert result.images.shape == (2, 64, 64, 1) and result.images.dtype == torch.uint8
    assert for_classifier(result.images).shape == (2, 1, 32, 32)
    report, _ = evaluate(engine.with_policy("window", {"window": 1}), n=20, seed=0, cfg=1.0)
    assert report.n == 20 and 0.0 <= report.accuracy <= 1.0 and report.fd > 0
    assert report.stored_fraction_of_vanilla < 1.0


def test_var_resume_continues_identically_at_680_tokens(tiny_pair, tmp_path):
    tokens = tiny_pair[3]
    cfg = replace(TINY_VAR, steps=4, checkpoint_every=2)
    whole = train_var(MNIST64.var, tokens, tmp_path / "whole", cfg, progress=False)
    first = train_var(MNIST64.var, tokens, tmp_path / "split", cfg, progress=False, max_new_steps=2)
    assert not first.finished and first.steps_done == 2
    rest = train_var(MNIST64.var, tokens, tmp_path / "split", cfg, resume=True, progress=False)
    a, b = read_state_dict(whole.weights_path), read_state_dict(rest.weights_path)
    assert rest.steps_done == 4 and all(torch.equal(a[k], b[k]) for k in a)
    assert rest.loss_history == whole.loss_history


def test_cli_trains_mnist64_stages_and_resumes(tmp_path, capsys):
    require_mnist()
    base = ["train-demo", "--model", "mnist64", "--out", str(tmp_path), "--limit", "32", "--batch-size", "8",
            "--checkpoint-every", "2", "--no-progress"]
    assert cli_main(["train-demo", "var", *base[1:]]) == 2  # no tokens yet
    assert "tokens.pt" in capsys.readouterr().out
    assert cli_main(["train-demo", "tokenize", *base[1:]]) == 2
    assert "mnist64_vae.pth" in capsys.readouterr().out
    assert cli_main(["train-demo", "vqvae", *base[1:], "--vqvae-steps", "4"]) == 0
    assert '"stage": "vqvae"' in capsys.readouterr().out
    assert cli_main(["train-demo", "tokenize", *base[1:]]) == 0
    assert '"tokens_per_image": 680' in capsys.readouterr().out
    assert cli_main(["train-demo", "var", *base[1:], "--var-steps", "4", "--minutes", "0"]) == 3  # capped at once
    assert "--resume" in capsys.readouterr().out
    assert cli_main(["train-demo", "var", *base[1:], "--var-steps", "3", "--resume"]) == 0
    assert '"steps": 3' in capsys.readouterr().out
    var, vae = load_pair(tmp_path / "mnist64_var.pth", tmp_path / "mnist64_vae.pth")
    assert var.config == MNIST64.var and vae.config == MNIST64.vae


def test_mnist64_data_is_the_padded_digit_upsampled_and_judged_after_an_area_downsample():
    require_mnist()
    from amskv_tools.demo.classifier import load_classifier, predict
    from amskv_tools.demo.data import load_mnist

    small, labels = load_mnist("test")
    large, labels64 = load_mnist("test", size=64)
    assert large.shape == (10000, 1, 64, 64) and torch.equal(labels, labels64)
    assert large.min() >= -1 and large.max() <= 1
    as_u8 = ((large[:500] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, 64, 64, 1)
    back = for_classifier(as_u8)
    assert (back - (small[:500] + 1) / 2).abs().mean() < 0.05  # close to the 32x32 image it came from
    assert (predict(load_classifier(), back) == labels[:500]).float().mean() > 0.95


def test_both_mnist64_checkpoints_ship():
    assert all((_weights_dir() / name).is_file() for name in bundled_files("mnist64"))  # VAR, VQVAE, profile


@pytest.mark.parametrize("command", [["generate", "--classes", "3", "--out", "{tmp}"], ["eval-quality", "--n", "10"]])
def test_cli_selects_mnist64_by_name(command, tmp_path, capsys):
    argv = [part.format(tmp=tmp_path) for part in command] + ["--model", "mnist64"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    if command[0] == "generate":
        with Image.open(next(tmp_path.glob("*.png"))) as image:
            assert image.size == (64, 64)
    else:
        assert "images            10 (seed 0, cfg 3.0)" in captured.out


def test_a_missing_bundled_file_is_one_line_that_names_it(tmp_path, monkeypatch, capsys):
    import amskv.engine

    monkeypatch.setattr(amskv.engine, "_weights_dir", lambda: tmp_path)
    assert cli_main(["generate", "--classes", "3", "--out", str(tmp_path / "out"), "--model", "mnist64"]) == 2
    err = capsys.readouterr().err
    assert "mnist64 is missing its weights" in err and "mnist64_var.pth" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_refuses_a_model_name_together_with_paths(tmp_path, capsys):
    assert cli_main(["generate", "--classes", "3", "--out", str(tmp_path), "--model", "demo",
                     "--var", "a.pth", "--vae", "b.pth"]) == 2
    assert "not both" in capsys.readouterr().err


def test_memory_knows_mnist64_without_weights(capsys):
    assert cli_main(["memory", "--model", "mnist64", "--policy", "full", "--batch", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"tokens": 680' in out and '"depth": 6' in out


def test_settings_select_a_bundled_model_and_exclude_paths():
    assert Settings().model is None  # the demo, as before
    assert Settings(model="mnist64").model == "mnist64"
    with pytest.raises(ValidationError) as excinfo:
        Settings(model="mnist64", var_checkpoint="var.pth")
    message = describe_validation_error(excinfo.value)
    assert "AMSKV_MODEL" in message and "AMSKV_VAR_CHECKPOINT" in message and "not both" in message
    with pytest.raises(ValidationError) as excinfo:
        Settings(model="mnist32")
    assert "invalid setting AMSKV_MODEL" in describe_validation_error(excinfo.value)


def test_serve_accepts_mnist64_by_name():
    from server.cli import check_paths

    assert check_paths(Settings(model="mnist64")) == []
    assert check_paths(Settings()) == []  # the demo ships
