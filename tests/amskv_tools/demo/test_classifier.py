"""Metric classifier: shipped weights score on real MNIST, input formats, augmentation, seeded training."""
from __future__ import annotations

import pytest
import torch

from amskv_tools.demo.classifier import (
    FEATURE_DIM,
    MnistClassifier,
    features,
    load_classifier,
    predict,
    random_shift,
    train_classifier,
)
from amskv_tools.demo.metrics import class_accuracy


@pytest.fixture(scope="module")
def real_test_subset(mnist_test_set):
    images, labels = mnist_test_set
    return images[:1000], labels[:1000]


def test_shipped_weights_classify_real_test_digits(real_test_subset):
    images, labels = real_test_subset
    model = load_classifier()
    assert not model.training
    assert class_accuracy(predict(model, images), labels) >= 0.97


def test_uint8_nhwc_input_gives_the_same_predictions(real_test_subset):
    images, _ = real_test_subset
    model = load_classifier()
    as_uint8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (N, 1, H, W) -> (N, H, W, 1)
    agreement = (predict(model, as_uint8) == predict(model, images)).float().mean().item()
    assert agreement >= 0.995


def test_features_are_128d_and_independent_of_batch_size():
    model = load_classifier()
    images = torch.rand(7, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = features(model, images)
    assert whole.shape == (7, FEATURE_DIM) and whole.dtype == torch.float32
    # not bit-exact: oneDNN/MKL may pick other kernels for 3 rows than for 7, summing in another order; features
    # reach ~14 (float32 ulp 9.5e-7) and differ by ~2 ulps here, so rtol 1e-5 (~80 ulps) covers other CPUs
    assert torch.allclose(features(model, images, batch_size=3), whole, rtol=1e-5, atol=1e-5)


def test_model_range_input_is_rejected():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        predict(load_classifier(), torch.full((2, 1, 32, 32), -1.0))


def test_random_shift_moves_each_image_by_at_most_max_shift():
    images = torch.full((64, 1, 32, 32), -1.0)
    images[:, 0, 16, 16] = 1.0  # one bright pixel in the middle
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    positions = (shifted[:, 0] == 1.0).nonzero()[:, 1:]  # (64, 2): row, col of the bright pixel
    assert len(positions) == 64  # it never leaves the frame, and background fills the rest
    assert (positions - 16).abs().max().item() == 2
    assert len({tuple(p) for p in positions.tolist()}) > 5  # offsets differ per image


def test_training_is_seeded_and_returns_eval_model():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(64, 1, 32, 32, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (64,), generator=gen)
    first = train_classifier(images, labels, epochs=1, batch_size=32, seed=5, progress=False)
    second = train_classifier(images, labels, epochs=1, batch_size=32, seed=5, progress=False)
    other = train_classifier(images, labels, epochs=1, batch_size=32, seed=6, progress=False)
    assert isinstance(first, MnistClassifier) and not first.training
    same = [torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values())]
    assert all(same)
    assert not torch.equal(first.fc.weight, other.fc.weight)
    assert not torch.equal(first.fc.weight, MnistClassifier().fc.weight)
