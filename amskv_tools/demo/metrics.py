"""Quality metrics for the MNIST demo model: Fréchet distance on classifier features, PSNR, token agreement.

Image convention for every function that takes images (see :func:`as_unit_images`):
- float tensors of shape (N, 1, 32, 32) with values in [0, 1] (values are clamped to [0, 1]), or
- uint8 tensors of shape (N, 32, 32, 1) (NHWC, as a decoded PNG), with values 0..255.
Model-range images in [-1, 1] are rejected rather than silently mis-scaled; convert them with ``(x + 1) / 2``.

Everything is plain torch (float64 for the statistics), so the serving install needs neither numpy nor scipy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from amskv.weights import load_shipped

REFERENCE_STATS_FILE = "mnist_test_stats.pt"
# mnist64: the same test images at 64x64 (load_mnist size=64), area-downsampled back to the classifier's 32x32
REFERENCE_STATS_FILE_64 = "mnist64_test_stats.pt"
# A [0, 1] image never goes below 0 except by decoder overshoot; a [-1, 1] image has background at -1.
_MODEL_RANGE_THRESHOLD = -0.25


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a set of feature vectors, float64."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int


def as_unit_images(images: torch.Tensor) -> torch.Tensor:
    """float (N, 1, 32, 32) in [0, 1] or uint8 (N, 32, 32, 1) -> float32 (N, 1, 32, 32) in [0, 1]."""
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 1:
            raise ValueError(f"uint8 images must be (N, H, W, 1), got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0  # (N, H, W, 1) -> (N, 1, H, W)
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"float images must be (N, 1, H, W), got {tuple(images.shape)}")
    if images.numel() and images.min().item() < _MODEL_RANGE_THRESHOLD:
        raise ValueError("float images look like model range [-1, 1]; pass (x + 1) / 2 (metrics expect [0, 1])")
    return images.float().clamp(0.0, 1.0)


def feature_stats(features: torch.Tensor) -> FeatureStats:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    return FeatureStats(mean=mean, cov=cov, count=int(x.shape[0]))


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues are rounding)."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``. The trace term uses
    ``tr((cov1 cov2)^(1/2)) = tr((s cov2 s)^(1/2))`` with ``s = cov1^(1/2)``: the inner matrix is symmetric
    PSD, so two ``eigh`` calls replace scipy's general ``sqrtm``.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    cov1, cov2 = cov1.to(torch.float64), cov2.to(torch.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, "
                         f"cov {tuple(cov1.shape)}/{tuple(cov2.shape)}")
    sqrt_cov1 = _psd_sqrt(cov1)
    inner = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    mean_term = (mu1 - mu2).square().sum()
    distance = mean_term + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)  # rounding can give -1e-12 for identical inputs


def save_reference_stats(stats: FeatureStats, path: str | Path, source: str) -> None:
    """Write the reference statistics (what ``amskv/weights/mnist_test_stats.pt`` holds)."""
    torch.save({"mean": stats.mean, "cov": stats.cov, "count": stats.count, "source": source}, str(path))


def load_reference_stats(path: str | Path | None = None, name: str = REFERENCE_STATS_FILE) -> FeatureStats:
    """Reference feature statistics; by default the shipped ones (``name``) of the 10k MNIST test images."""
    blob = load_shipped(name, path)
    return FeatureStats(mean=blob["mean"].to(torch.float64), cov=blob["cov"].to(torch.float64),
                        count=int(blob["count"]))


def fd_to_reference(features: torch.Tensor, reference: FeatureStats | None = None) -> float:
    """FD between (N, 128) classifier features and the reference (default: shipped MNIST test stats)."""
    reference = load_reference_stats() if reference is None else reference
    stats = feature_stats(features)
    return frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)


def pixel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared pixel difference over all images, on the [0, 1] scale (see module doc for formats)."""
    unit_a, unit_b = as_unit_images(a), as_unit_images(b)
    if unit_a.shape != unit_b.shape:
        raise ValueError(f"shape mismatch {tuple(unit_a.shape)} vs {tuple(unit_b.shape)}")
    return float((unit_a.double() - unit_b.double()).square().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of the pooled MSE over all pixels of [0, 1] images; ``inf`` when they are identical."""
    mse = pixel_mse(a, b)
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def token_agreement(tokens_a: list[torch.Tensor], tokens_b: list[torch.Tensor]) -> dict:
    """Fraction of equal token indices, per scale and overall (overall weights every token equally).

    ``tokens_a[s]`` and ``tokens_b[s]`` are the (B, pn*pn) code indices of scale ``s``.
    Returns ``{"per_scale": [float, ...], "overall": float}``.
    """
    if len(tokens_a) != len(tokens_b) or not tokens_a:
        raise ValueError(f"need the same non-zero number of scales, got {len(tokens_a)} and {len(tokens_b)}")
    per_scale, equal_total, count_total = [], 0, 0
    for scale, (ta, tb) in enumerate(zip(tokens_a, tokens_b)):
        if ta.shape != tb.shape:
            raise ValueError(f"scale {scale}: shape mismatch {tuple(ta.shape)} vs {tuple(tb.shape)}")
        equal = int((ta == tb).sum())
        per_scale.append(equal / ta.numel())
        equal_total += equal
        count_total += ta.numel()
    return {"per_scale": per_scale, "overall": equal_total / count_total}


def class_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predicted labels (N,) equal to the requested/true labels (N,)."""
    if pred.shape != labels.shape or pred.numel() == 0:
        raise ValueError(f"need equal non-empty shapes, got {tuple(pred.shape)} and {tuple(labels.shape)}")
    return int((pred == labels).sum()) / pred.numel()  # exact count over a Python float division, not a float32 mean
