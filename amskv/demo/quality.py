"""How much a KV policy costs in image quality, measured on the demo model.

Images of one policy are compared with the shipped MNIST classifier (class accuracy, Fréchet distance
on its features against the MNIST test set) and with the `full` cache at identical seeds (token
agreement per scale, pixel PSNR). Fidelity to `full` is the sharp, deterministic signal; accuracy
saturates for a good model (docs/demo-model.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from amskv.demo.classifier import features, load_classifier, predict
from amskv.demo.metrics import (REFERENCE_STATS_FILE, REFERENCE_STATS_FILE_64, class_accuracy, fd_to_reference,
                                load_reference_stats, psnr, token_agreement)
from amskv.kvcache.policy import make_policy
from amskv.memory import kv_memory
from amskv.sampling import SamplingParams

EVAL_BATCH = 100
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
             classifier=None) -> tuple[QualityReport, Samples]:
    """Quality of ``engine``'s policy; ``reference`` (the `full` samples at the same seeds) is made if absent."""
    params = SamplingParams(cfg=cfg, top_k=0, top_p=0.0)
    classifier = classifier or load_classifier()
    if reference is None:
        reference = sample(engine.with_policy("full"), n, seed, params)
    ours = sample(engine, n, seed, params)
    cfg_model = engine.config
    vanilla = kv_memory(cfg_model, make_policy("vanilla", cfg_model.patch_nums), 1, engine.dtype)
    mem = engine.memory(1)
    report = QualityReport(
        policy=engine.policy.describe(), n=n, seed=seed, cfg=cfg,
        accuracy=class_accuracy(predict(classifier, for_classifier(ours.images)), ours.labels),
        fd=fd_to_reference(features(classifier, for_classifier(ours.images)), reference_stats(engine.resolution)),
        token_agreement=token_agreement(ours.tokens, reference.tokens),
        psnr_vs_full=psnr(ours.images, reference.images),
        kv_bytes_per_image=mem.allocated_bytes,
        kv_peak_stored_bytes_per_image=mem.peak_stored_bytes,
        measured_stored_bytes_per_image=ours.peak_stored_per_image,
        stored_fraction_of_vanilla=ours.peak_stored_per_image / vanilla.allocated_bytes,
        allocated_fraction_of_vanilla=mem.allocated_bytes / vanilla.allocated_bytes,
    )
    return report, reference


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


# The comparison of docs/demo-model.md: (label, policy, args). c_min/c_max are tokens per layer and sequence;
# the demo's scales hold 1, 4, 9, 16, 25, 36 and 64 tokens (condensed scales 0-1: 5 tokens).
SWEEP: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("vanilla", "vanilla", {}),
    ("amskv default preset", "amskv", {}),
    ("amskv aggressive preset", "amskv", {"preset": "aggressive"}),
    ("amskv-static default, shipped profile", "amskv-static", {"profile": "bundled"}),
    ("amskv cds=2 c_min=41 c_max=66 theta=0.45", "amskv", {"c_cds": 2, "c_min": 41, "c_max": 66, "theta": 0.45}),
    ("amskv cds=1 c_min=37 c_max=62 theta=0.45", "amskv", {"c_cds": 1, "c_min": 37, "c_max": 62, "theta": 0.45}),
    ("amskv-static default, layer 3 demanding instead", "amskv-static", {"demanding": "0001"}),
    ("amskv-static cds=2 41/66, layer 0 demanding", "amskv-static",
     {"c_cds": 2, "c_min": 41, "c_max": 66, "demanding": "1000"}),
    ("amskv cds=2 c_min=c_max=41 (no expansion)", "amskv", {"c_cds": 2, "c_min": 41, "c_max": 41}),
    ("amskv cds=2 c_min=c_max=66 (all layers expanded)", "amskv", {"c_cds": 2, "c_min": 66, "c_max": 66}),
    ("window w=1", "window", {"window": 1}),
    ("window w=2", "window", {"window": 2}),
    ("sink 1 + w=1", "sink", {"sink": 1, "window": 1}),
    ("sink 2 + w=1", "sink", {"sink": 2, "window": 1}),
    ("sink 2 + w=2", "sink", {"sink": 2, "window": 2}),
    ("current scale only (window w=0)", "window", {"window": 0}),
]


def sweep(engine, n: int, seed: int, cfgs: tuple[float, ...], profile_path=None, progress=print) -> list[dict]:
    """One row per (policy, cfg); the `full` samples at each cfg are made once and shared."""
    classifier = load_classifier()
    rows = []
    for cfg in cfgs:
        reference = sample(engine.with_policy("full"), n, seed, SamplingParams(cfg=cfg, top_k=0, top_p=0.0))
        for label, name, args in SWEEP:
            args = dict(args)
            if args.get("profile") == "bundled":
                if profile_path is None:
                    continue  # no profile given: the row is left out
                args["profile"] = str(profile_path)
            report, _ = evaluate(engine.with_policy(name, args), n, seed, cfg, reference, classifier)
            row = {"label": label, **report.to_dict()}
            progress(f"cfg {cfg} {label}: acc {row['accuracy']:.4f} fd {row['fd']:.3f} "
                     f"psnr {row['psnr_vs_full']} stored {row['stored_fraction_of_vanilla']:.3f}")
            rows.append(row)
    return rows
