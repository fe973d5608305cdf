"""Calibration at load: the per-layer AMS-KV profile of a checkpoint, measured once and cached by content hash.

When a checkpoint comes without a profile, ``Engine.load`` runs a short calibration (``calibrate_engine``):
a few images with classes spread over the label space and fixed seeds, generated under ``full``; the
inter-scale key similarity of every layer is measured only at the scales where the AMS-KV budget overflows
(the online test scales), and the ``demanding`` rule of docs/kv-cache.md §6 flags the least similar layers.
The result is stored as JSON in a cache directory under a name made of the checkpoints' SHA-256 and the
calibration parameters, so a restart reuses it (``resolve_profile``). The library never reads the
environment: the caller (the server's settings) passes the cache directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from amskv.analysis import calibrate, layer_similarity, online_test_scales
from amskv.kvcache.policy import AMSKVPolicy
from amskv.kvcache.profile import FORMAT, CalibrationProfile, read_profile, write_profile
from amskv.kvcache.similarity import key_similarity

logger = logging.getLogger(__name__)

ProfileSource = Literal["calibrated", "cached", "file", "none"]
PROFILE_SOURCES: tuple[ProfileSource, ...] = get_args(ProfileSource)
AUTO, OFF = "auto", "off"  # the two profile modes that are not a file path


@dataclass(frozen=True)
class CalibrationSettings:
    """How much work one calibration may do. The time cap is checked between batches: at least one batch runs."""

    images: int = 8
    batch: int = 4
    time_limit_s: float = 60.0
    demanding_fraction: float = 0.25  # share of layers flagged demanding (at least one layer)
    cfg: float = 4.0
    seed: int = 0

    def __post_init__(self):
        if self.images < 1 or self.batch < 1 or self.time_limit_s <= 0 or not 0 <= self.demanding_fraction <= 1:
            raise ValueError("calibration needs images >= 1, batch >= 1, time_limit_s > 0 and a fraction in [0, 1]")

    def key_params(self) -> dict:
        # the time bound too: a calibration cut short by a small bound is not the one a larger bound makes
        return {"images": self.images, "demanding_fraction": self.demanding_fraction, "cfg": self.cfg,
                "seed": self.seed, "time_limit_s": self.time_limit_s}


@dataclass(frozen=True)
class KVCacheConfig:
    """How an engine's KV cache is set up: the policy, its arguments, and where its calibration profile comes from.

    ``profile``: ``auto`` (a bundled model's shipped file; else the profile cached in ``cache_dir`` for these
    checkpoints' contents; else a calibration now), ``off`` (no profile: every layer planned as demanding), or a
    profile file. A ``profile=`` or ``demanding=`` policy argument overrides it (``resolve_profile``).
    """

    policy: str
    policy_args: Mapping[str, object] = field(default_factory=dict)
    profile: str | Path = AUTO
    cache_dir: str | Path | None = None
    calibration: CalibrationSettings = CalibrationSettings()


@dataclass(frozen=True)
class ProfileResolution:
    """Which profile the engine runs with, and where it came from (one of ``PROFILE_SOURCES``)."""

    profile: CalibrationProfile | None
    source: ProfileSource
    path: Path | None = None
    seconds: float = 0.0  # calibration time; 0 unless source == "calibrated"


class SimilarityObserver:
    """The ``observer`` hook of ``KVCache``: both similarity measures, at the test scales only, weighted by rows."""

    def __init__(self, patch_nums: tuple[int, ...], scales: tuple[int, ...]):
        self.patch_nums, self.scales = tuple(patch_nums), set(scales)
        self.sums: dict[str, dict[int, dict[int, float]]] = {"cosine": {}, "neg_l2": {}}
        self.rows: dict[int, dict[int, int]] = {}

    def __call__(self, layer, si, q, k_all, v_all, segments) -> None:
        prev = next((s for s in segments if s.scale == si - 1), None)
        if si not in self.scales or prev is None:
            return
        T, rows = q.shape[2], q.shape[0]
        k_prev, k_cur = k_all[:, :, prev.start:prev.start + prev.length], k_all[:, :, -T:]
        for measure, sums in self.sums.items():
            value = key_similarity(k_prev, k_cur, self.patch_nums[si - 1], self.patch_nums[si], measure)
            by_scale = sums.setdefault(layer, {})
            by_scale[si] = by_scale.get(si, 0.0) + value * rows
        self.rows.setdefault(layer, {})[si] = self.rows.get(layer, {}).get(si, 0) + rows

    def similarity(self, measure: str = "cosine") -> dict[int, dict[int, float]]:
        return {layer: {si: v / self.rows[layer][si] for si, v in by_scale.items()}
                for layer, by_scale in self.sums[measure].items()}


def calibration_labels(n: int, num_classes: int) -> list[int]:
    """``n`` classes spread evenly over 0..num_classes-1 (repeating when n > num_classes)."""
    if n == 1:
        return [0]
    return [round(i * (num_classes - 1) / (n - 1)) for i in range(n)]


def demanding_count(depth: int, fraction: float) -> int:
    """The rule: round(fraction * depth) layers, but at least one (a model always has a least similar layer)."""
    return min(depth, max(1, round(fraction * depth)))


def calibrate_engine(engine, policy: AMSKVPolicy,
                     settings: CalibrationSettings = CalibrationSettings()) -> CalibrationProfile:
    """Measure ``engine``'s layers and flag the demanding ones for ``policy``'s parameters (see module doc)."""
    from amskv.sampling import SamplingParams

    cfg = engine.config
    began = time.perf_counter()
    scales = online_test_scales(policy, cfg.patch_nums)
    observer = SimilarityObserver(cfg.patch_nums, scales)
    full = engine.with_policy("full")
    labels = calibration_labels(settings.images, engine.num_classes)
    params, done = SamplingParams(cfg=settings.cfg), 0
    while done < len(labels):
        chunk = labels[done:done + settings.batch]
        seeds = [settings.seed + done + i for i in range(len(chunk))]
        full.generate_tokens(chunk, seeds, params, observer=observer)
        done += len(chunk)
        if time.perf_counter() - began > settings.time_limit_s:
            break  # the cap: fewer images, but every layer has been measured at every test scale
    similarity = observer.similarity("cosine")
    fraction = demanding_count(cfg.depth, settings.demanding_fraction) / cfg.depth
    profile = calibrate(similarity, cfg.depth, policy, cfg.patch_nums, target_fraction=fraction,
                        model=engine.model_name, samples=done)
    neg_l2 = layer_similarity(observer.similarity("neg_l2"), cfg.depth, scales)
    return CalibrationProfile(**{**profile.__dict__, "layer_similarity_neg_l2": tuple(neg_l2),
                                 "seconds": time.perf_counter() - began, "time_limit_s": settings.time_limit_s,
                                 "cut_short": done < len(labels)})


def default_cache_dir(environ: Mapping[str, str], home: Path) -> Path:
    """Where calibrated profiles are cached unless told otherwise, by the XDG base-directory rule:
    $XDG_CACHE_HOME/amskv/profiles when that is set and absolute, else ~/.cache/amskv/profiles. The caller
    passes its environment (the library reads none); the server and the CLI commands share this rule."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return base / "amskv" / "profiles"


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_path(cache_dir: str | Path, var_path, vae_path, policy: AMSKVPolicy, settings: CalibrationSettings) -> Path:
    """``<var sha256[:16]>-<vae sha256[:16]>-<parameters digest>.json``: a new checkpoint or new AMS-KV
    parameters (they choose the test scales) get a new file; device and dtype do not."""
    params = {"format": FORMAT, "c_cds": policy.c_cds, "c_min": policy.c_min, "c_max": policy.c_max,
              **settings.key_params()}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{file_sha256(var_path)[:16]}-{file_sha256(vae_path)[:16]}-{digest}.json"


def resolve_profile(kv: KVCacheConfig, engine, var_path: str | Path, vae_path: str | Path,
                    bundled: Path | None = None) -> ProfileResolution:
    """The one place a profile is chosen, first match wins: the policy's own ``demanding=`` flags or ``profile=``
    file; ``off``; a profile file; a bundled model's shipped profile (``bundled``); the profile cached for these
    checkpoints; a calibration now."""
    given = kv.policy_args.get("profile")
    if "demanding" in kv.policy_args:
        return ProfileResolution(None, "file")
    if given is not None:
        return ProfileResolution(read_profile(str(given)), "file", Path(str(given)))
    if str(kv.profile) == OFF:
        return ProfileResolution(None, "none")
    if str(kv.profile) != AUTO:
        return ProfileResolution(read_profile(kv.profile), "file", Path(kv.profile))
    if bundled is not None and bundled.is_file():
        return ProfileResolution(read_profile(bundled), "file", bundled)
    return cached_or_calibrated(engine, engine.policy, var_path, vae_path, kv.cache_dir, kv.calibration)


def cached_or_calibrated(engine, policy: AMSKVPolicy, var_path, vae_path, cache_dir: str | Path | None,
                         settings: CalibrationSettings = CalibrationSettings()) -> ProfileResolution:
    """The cached profile of these checkpoints, else a fresh calibration (written to the cache when it has one)."""
    path = cache_path(cache_dir, var_path, vae_path, policy, settings) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            profile = read_profile(path)
            if profile.depth == engine.config.depth:
                return ProfileResolution(profile, "cached", path)
            logger.warning("ignoring cached profile %s: %d layers, the model has %d", path, profile.depth,
                           engine.config.depth)
        except ValueError as exc:  # a truncated or foreign file: calibrate again and overwrite it
            logger.warning("ignoring cached profile %s: %s", path, exc)
    profile = calibrate_engine(engine, policy, settings)
    if path is not None:
        try:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            write_profile(tmp, profile)
            tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
        except OSError as exc:  # a read-only cache must not stop the model from loading
            logger.warning("could not write the calibration cache %s: %s", path, exc)
            path = None
    return ProfileResolution(profile, "calibrated", path, profile.seconds)


def describe(resolution: ProfileResolution) -> str:
    profile = resolution.profile
    if profile is None:
        return f"profile {resolution.source}"
    theta = "n/a" if profile.theta is None or not math.isfinite(profile.theta) else f"{profile.theta:.4g}"
    where = f" ({resolution.path})" if resolution.path else ""
    timing = f" in {resolution.seconds:.2f} s on {profile.samples} images" if resolution.source == "calibrated" else ""
    return (f"profile {resolution.source}{where}{timing}: theta {theta}, demanding layers "
            f"{[i for i, d in enumerate(profile.demanding) if d]}")
