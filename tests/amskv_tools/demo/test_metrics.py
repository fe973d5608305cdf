"""Quality metrics: closed-form FD checks, real-feature FD sanity (shipped weights + stats), PSNR, agreement."""
from __future__ import annotations

import math

import pytest
import torch

from amskv_tools.demo.classifier import features, load_classifier
from amskv_tools.demo.metrics import (
    as_unit_images,
    class_accuracy,
    fd_to_reference,
    feature_stats,
    frechet_distance,
    load_reference_stats,
    pixel_mse,
    psnr,
    token_agreement,
)


def _random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q


def test_fd_matches_closed_form_for_commuting_covariances():
    # With a shared eigenbasis, tr((C1 C2)^1/2) = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    gen = torch.Generator().manual_seed(0)
    q = _random_orthogonal(16, gen)
    a = torch.rand(16, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(16, generator=gen, dtype=torch.float64) * 3
    mu1, mu2 = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(float(expected), rel=1e-9)


def test_fd_is_zero_for_identical_and_symmetric_for_general_gaussians():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(200, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen, dtype=torch.float64)
    sx, sy = feature_stats(x), feature_stats(y)
    assert frechet_distance(sx.mean, sx.cov, sx.mean, sx.cov) == pytest.approx(0.0, abs=1e-9)
    forward = frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov)
    assert forward > 1.0
    assert frechet_distance(sy.mean, sy.cov, sx.mean, sx.cov) == pytest.approx(forward, rel=1e-9)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_feature_stats_match_torch_cov():
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(2))
    stats = feature_stats(x)
    assert stats.count == 50 and stats.mean.dtype == torch.float64
    assert torch.allclose(stats.cov, torch.cov(x.double().T), atol=1e-12)
    with pytest.raises(ValueError):
        feature_stats(torch.zeros(1, 5))


def test_shipped_reference_stats_shapes():
    ref = load_reference_stats()
    assert ref.count == 10_000
    assert ref.mean.shape == (128,) and ref.cov.shape == (128, 128) and ref.cov.dtype == torch.float64
    assert torch.allclose(ref.cov, ref.cov.T) and torch.linalg.eigvalsh(ref.cov).min() > -1e-9


@pytest.fixture(scope="module")
def real_test_features(mnist_test_set):
    return features(load_classifier(), mnist_test_set[0])


@pytest.mark.slow
def test_fd_between_halves_of_real_test_set_is_small(real_test_features):
    perm = torch.randperm(len(real_test_features), generator=torch.Generator().manual_seed(0))
    a, b = feature_stats(real_test_features[perm[:5000]]), feature_stats(real_test_features[perm[5000:]])
    assert frechet_distance(a.mean, a.cov, b.mean, b.cov) < 0.5
    # the shipped reference was computed from exactly these features
    assert fd_to_reference(real_test_features) < 1e-3


def test_fd_of_noise_images_to_reference_is_large():
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    assert fd_to_reference(features(load_classifier(), noise)) > 20.0


def test_unit_image_formats_agree_and_model_range_is_rejected():
    unit = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    as_uint8 = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, 1, H, W) -> (N, H, W, 1)
    assert torch.allclose(as_unit_images(as_uint8), unit, atol=0.5 / 255 + 1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        as_unit_images(unit * 2 - 1)
    with pytest.raises(ValueError):
        as_unit_images(as_uint8.permute(0, 3, 1, 2))  # uint8 must be NHWC
    with pytest.raises(ValueError):
        as_unit_images(unit.permute(0, 2, 3, 1))  # float must be NCHW


def test_psnr_and_pixel_mse_known_values():
    a = torch.zeros(2, 1, 32, 32)
    # float32: 0.1 is stored as 0.1 + 1.5e-9, so the MSE is 0.01 + 3e-10 (rel 3e-8), the mean of equal values adds
    # a few ulps; rel 1e-6 leaves ~30x room, and 1e-4 dB is 10 * log10(1 + 2.3e-5) of the same
    assert pixel_mse(a, a + 0.1) == pytest.approx(0.01, rel=1e-6)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, a) == math.inf
    white = torch.full((2, 32, 32, 1), 255, dtype=torch.uint8)
    assert psnr(white, torch.ones(2, 1, 32, 32)) == math.inf  # mixed formats compare on the same scale
    with pytest.raises(ValueError, match="shape"):
        pixel_mse(a, torch.zeros(3, 1, 32, 32))


def test_token_agreement_per_scale_and_token_weighted_overall():
    a = [torch.tensor([[1], [2]]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])]
    b = [torch.tensor([[1], [0]]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])]
    result = token_agreement(a, b)
    assert result["per_scale"] == [0.5, 7 / 8]
    assert result["overall"] == pytest.approx(8 / 10, rel=1e-12)  # a float64 ratio of counts
    with pytest.raises(ValueError):
        token_agreement(a, b[:1])
    with pytest.raises(ValueError):
        token_agreement(a, [b[0], b[1][:, :3]])


def test_class_accuracy():
    assert class_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        class_accuracy(torch.tensor([1]), torch.tensor([1, 2]))
