"""Conformance with tensors produced by the original implementation (tests/golden).

The reference tensors were made on one CPU; this suite runs on others (AMD AVX-512, Intel AVX-512 + AMX), whose
GEMM and convolution kernels sum in other orders. Floats are therefore compared within tolerances (tests/README.md):
- `vae.*` within 1e-5 absolute: values of magnitude <= 4.5, where a float32 ulp is <= 4.8e-7; 1e-5 is ~20 ulps,
  room for the reordered sums of a 3x3 convolution stack, while a wrong tap or scale moves values by 1e-2 or more.
- teacher-forcing logits within 1e-4 absolute: magnitudes <= 9 (ulp 9.5e-7), two transformer blocks of width-128
  dot products; ~100 ulps.
Discrete outputs are exact because the references leave a margin wider than twice those tolerances: the argmax
(the smallest top-1 - top-2 gap is 2.4e-4 > 2 x 1e-4, so no tie can flip) and the encoder's indices (nearest code
margin 2.5e-3). `test_the_margins_make_exact_indices_meaningful` checks that the data keeps those margins.
"""
import json

import torch

from amskv.config import PATCH_NUMS_256
from amskv.model.vqvae import phi_index_per_scale


def split(idx, patch_nums=PATCH_NUMS_256):
    return list(idx.split([p * p for p in patch_nums], dim=1))


def test_phi_table_matches_reference(golden_dir):
    meta = json.loads((golden_dir / "reference.json").read_text())
    assert phi_index_per_scale(4, 10) == meta["phi_index_per_scale"] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


LOGIT_ATOL = 1e-4  # see the module docstring


def test_the_margins_make_exact_indices_meaningful(golden_ref):
    # logits within LOGIT_ATOL of the reference cannot swap a top-1 whose lead exceeds 2 x LOGIT_ATOL
    assert golden_ref["tf.top2_margin"].min() > 2 * LOGIT_ATOL
    assert golden_ref["vae.enc_dist_margin"].min() > 1e-3


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
    torch.testing.assert_close(logits[0], golden_ref["tf.logits_b0"], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(logits[..., :256], golden_ref["tf.logits_vslice"], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), golden_ref["tf.lse"], atol=LOGIT_ATOL, rtol=0)
    # a sum of 4096 logits: 4096 x LOGIT_ATOL bounds the drift; 1e-2 is a quarter of that, still 10x the spread seen
    torch.testing.assert_close(logits.sum(-1), golden_ref["tf.logits_sum_per_token"], atol=1e-2, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), golden_ref["tf.argmax"])  # exact: the margin test above
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 4096), golden_ref["vae.idx_BL"].view(-1))
    torch.testing.assert_close(ce, golden_ref["tf.ce_loss"], atol=LOGIT_ATOL, rtol=0)
