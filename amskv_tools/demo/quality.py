"""How much a KV policy costs in image quality, measured on the demo model.

Images of one policy are compared with the shipped MNIST classifier (class accuracy, Fréchet distance
on its features against the MNIST test set) and with the `full` cache at identical seeds (token
agreement per scale, pixel PSNR). Fidelity to `full` is the sharp, deterministic signal; accuracy
saturates for a good model (docs/demo-model.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import math
import statistics

import torch
import torch.nn.functional as F

from amskv_tools.demo.classifier import features, load_classifier, predict
from amskv_tools.demo.metrics import (REFERENCE_STATS_FILE, REFERENCE_STATS_FILE_64, class_accuracy, fd_to_reference,
                                load_reference_stats, psnr, token_agreement)
from amskv.kvcache.policy import make_policy
from amskv.memory import kv_memory
from amskv.sampling import SamplingParams

EVAL_BATCH = 100
NOISE_BLOCK = 100  # images per block of the noise estimate
CLASSIFIER_SIZE = 32  # the shipped classifier's input; mnist64 images are area-downsampled to it
REFERENCE_STATS = {32: REFERENCE_STATS_FILE, 64: REFERENCE_STATS_FILE_64}


@dataclass
class Samples:
    images: torch.Tensor  # uint8 (N, H, W, 1)
    tokens: list[torch.Tensor]  # per scale (N, pn*pn)
    labels: torch.Tensor  # (N,)
    peak_stored_per_image: int = 0  # what the cache really held, per image (max over the batches)


@dataclass
class QualityReport:
    policy: str
    n: int
    seed: int
    cfg: float
    accuracy: float
    fd: float
    token_agreement: dict
    psnr_vs_full: float
    kv_bytes_per_image: int  # allocated: what a batch reserves
    kv_peak_stored_bytes_per_image: int  # the most the cache holds at once (worst case for online amskv)
    measured_stored_bytes_per_image: int  # what it held in these runs (online amskv: its real expansions)
    stored_fraction_of_vanilla: float  # measured
    allocated_fraction_of_vanilla: float
    # the noise these runs recorded: standard error of the means of blocks of NOISE_BLOCK images
    noise_blocks: int = 0
    accuracy_se: float | None = None
    psnr_se: float | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["psnr_vs_full"] == float("inf"):  # identical to full; JSON has no infinity
            data["psnr_vs_full"] = None
        return data


def sample(engine, n: int, seed: int, params: SamplingParams, batch: int = EVAL_BATCH) -> Samples:
    """n images, labels cycling over the classes, image i with seed + i."""
    labels = [i % engine.num_classes for i in range(n)]
    images, tokens, stored = [], [], 0
    for start in range(0, n, batch):
        res = engine.generate(labels[start:start + batch], [seed + i for i in range(start, min(n, start + batch))],
                              params)
        images.append(res.images)
        tokens.append(res.tokens)
        stored = max(stored, res.kv_peak_stored_bytes // len(res.images))
    per_scale = [torch.cat([t[s] for t in tokens]) for s in range(len(tokens[0]))]
    return Samples(torch.cat(images), per_scale, torch.tensor(labels), stored)


def evaluate(engine, n: int = 1000, seed: int = 0, cfg: float = 3.0, reference: Samples | None = None,
             classifier=None, reuse_reference: bool = False) -> tuple[QualityReport, Samples]:
    """Quality of ``engine``'s policy; ``reference`` (the `full` samples at the same seeds) is made if absent.
    ``reuse_reference``: ``engine``'s policy attends exactly as `full` does (`full` itself, or `vanilla`), so the
    reference samples are its samples (not generated again)."""
    params = SamplingParams(cfg=cfg, top_k=0, top_p=0.0)
    classifier = classifier or load_classifier()
    if reference is None:
        reference = sample(engine.with_policy("full"), n, seed, params)
    ours = reference if reuse_reference else sample(engine, n, seed, params)
    predicted = predict(classifier, for_classifier(ours.images))
    cfg_model = engine.config
    # reused samples were made by `full`: another (static) policy's bytes are its plan's, which are exact
    mem = engine.memory(1)
    stored = ours.peak_stored_per_image if not reuse_reference or engine.policy.name == "full" else \
        mem.peak_stored_bytes
    vanilla = kv_memory(cfg_model, make_policy("vanilla", cfg_model.patch_nums), 1, engine.dtype)
    report = QualityReport(
        policy=engine.policy.describe(), n=n, seed=seed, cfg=cfg,
        accuracy=class_accuracy(predicted, ours.labels),
        fd=fd_to_reference(features(classifier, for_classifier(ours.images)), reference_stats(engine.resolution)),
        token_agreement=token_agreement(ours.tokens, reference.tokens),
        psnr_vs_full=psnr(ours.images, reference.images),
        kv_bytes_per_image=mem.allocated_bytes,
        kv_peak_stored_bytes_per_image=mem.peak_stored_bytes,
        measured_stored_bytes_per_image=stored,
        stored_fraction_of_vanilla=stored / vanilla.allocated_bytes,
        allocated_fraction_of_vanilla=mem.allocated_bytes / vanilla.allocated_bytes,
        **block_noise(predicted, ours, reference),
    )
    return report, reference


def block_noise(predicted: torch.Tensor, ours: Samples, reference: Samples) -> dict:
    """Standard errors of accuracy and PSNR from blocks of NOISE_BLOCK images (needs two blocks or more)."""
    accs, psnrs = [], []
    for start in range(0, len(ours.labels) - NOISE_BLOCK + 1, NOISE_BLOCK):
        block = slice(start, start + NOISE_BLOCK)
        accs.append(class_accuracy(predicted[block], ours.labels[block]))
        value = psnr(ours.images[block], reference.images[block])
        if math.isfinite(value):
            psnrs.append(value)

    def standard_error(values):
        # float64 (statistics), not torch's float32: a float32 std differs between CPU kinds in the 7th digit
        return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None

    return {"noise_blocks": len(accs), "accuracy_se": standard_error(accs), "psnr_se": standard_error(psnrs)}


def for_classifier(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 1) uint8 -> (N, 1, 32, 32) in [0, 1]; larger images (mnist64) are area-downsampled."""
    unit = images_u8.permute(0, 3, 1, 2).float().div_(255)
    if unit.shape[-1] != CLASSIFIER_SIZE:
        unit = F.interpolate(unit, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")
    return unit


def reference_stats(resolution: int):
    """The real test images' feature statistics prepared as the model's images are (see REFERENCE_STATS)."""
    if resolution not in REFERENCE_STATS:
        raise ValueError(f"eval-quality knows MNIST at {sorted(REFERENCE_STATS)} px, not {resolution}")
    return load_reference_stats(name=REFERENCE_STATS[resolution])
