"""Conformance with tensors produced by the original implementation (tests/golden)."""
import json

import torch

from amskv.config import PATCH_NUMS_256
from amskv.model.vqvae import phi_index_per_scale


def split(idx, patch_nums=PATCH_NUMS_256):
    return list(idx.split([p * p for p in patch_nums], dim=1))


def test_phi_table_matches_reference(golden_dir):
    meta = json.loads((golden_dir / "reference.json").read_text())
    assert phi_index_per_scale(4, 10) == meta["phi_index_per_scale"] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_indices_to_fhat_and_image(golden_engine, golden_ref):
    q = golden_engine.vae.quantize
    idx = split(golden_ref["vae.idx_BL"])
    with torch.no_grad():
        torch.testing.assert_close(q.idx_to_fhat(idx), golden_ref["vae.fhat_from_idx"], atol=1e-5, rtol=0)
        steps = torch.stack(q.idx_to_fhat(idx, cumulative=True))
        torch.testing.assert_close(steps, golden_ref["vae.fhat_per_scale_from_idx"], atol=1e-5, rtol=0)
        pre = golden_engine.vae.fhat_to_img(golden_ref["vae.fhat_from_idx"], clamp=False)
        torch.testing.assert_close(pre, golden_ref["vae.img_from_idx_preclamp"], atol=1e-5, rtol=0)
        torch.testing.assert_close(golden_engine.vae.idx_to_img(idx), golden_ref["vae.img_from_idx"], atol=1e-5, rtol=0)
        torch.testing.assert_close(q.idx_to_var_input(idx), golden_ref["vae.var_input_from_idx"], atol=1e-5, rtol=0)


def test_encoder_to_indices(golden_engine, golden_ref):
    vae = golden_engine.vae
    with torch.no_grad():
        f = vae.encode(golden_ref["vae.enc_img"])
        torch.testing.assert_close(f, golden_ref["vae.enc_f"], atol=1e-5, rtol=0)
        idx = torch.cat(vae.img_to_idx(golden_ref["vae.enc_img"]), dim=1)
    assert torch.equal(idx, golden_ref["vae.enc_idx_BL"])


def test_teacher_forcing_logits(golden_engine, golden_ref):
    with torch.no_grad():
        logits = golden_engine.var(torch.tensor([207, 1000]), golden_ref["vae.var_input_from_idx"])
    assert logits.shape == (2, 680, 4096)
    torch.testing.assert_close(logits[0], golden_ref["tf.logits_b0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[..., :256], golden_ref["tf.logits_vslice"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), golden_ref["tf.lse"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.sum(-1), golden_ref["tf.logits_sum_per_token"], atol=1e-2, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), golden_ref["tf.argmax"])
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 4096), golden_ref["vae.idx_BL"].view(-1))
    torch.testing.assert_close(ce, golden_ref["tf.ce_loss"], atol=1e-4, rtol=0)
