"""Attention analysis and layer calibration for `amskv analyze`.

Two passes over the same labels and seeds:

- under the ``full`` policy (every earlier scale visible), an observer computes explicit softmax
  probabilities to get the attention density d(i<-j) (the AMS-KV paper's; docs/kv-cache.md §6) and the inter-scale key
  similarity of every layer and scale (the AMS-KV expansion signal, ``kvcache.similarity.key_similarity``);
- under the policy being studied, the scales each layer keeps (what every query scale could see).

Calibration turns the similarities into per-layer ``demanding`` flags for ``amskv-static``.
matplotlib is imported only when heatmaps are drawn.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from amskv.kvcache.policy import AMSKVPolicy, OnlineAMSKVPolicy
from amskv.kvcache.profile import CalibrationProfile
from amskv.kvcache.similarity import key_similarity
from amskv.memory import plan_kv

HEAD_CHUNK = 8  # heads per probability matrix: bounds the (rows, heads, T, N) float32 temporary


class AttentionObserver:
    """The ``observer`` hook of ``KVCache``: accumulates density and similarity, weighted by rows."""

    def __init__(self, depth: int, patch_nums: tuple[int, ...], attn_scale: float):
        K = len(patch_nums)
        self.patch_nums, self.attn_scale = tuple(patch_nums), attn_scale
        self.density_sum = torch.zeros(depth, K, K, dtype=torch.float64)  # [layer, query scale j, key scale i]
        self.density_rows = torch.zeros(depth, K, K, dtype=torch.float64)
        self.sim_sum = torch.zeros(depth, K, dtype=torch.float64)  # [layer, scale]
        self.sim_rows = torch.zeros(depth, K, dtype=torch.float64)

    def __call__(self, layer, si, q, k_all, v_all, segments) -> None:
        rows, H, T, _ = q.shape
        N = k_all.shape[2]
        mass = torch.empty(rows, H, N, dtype=torch.float32, device=q.device)  # attention mass per key
        for h in range(0, H, HEAD_CHUNK):
            hs = slice(h, h + HEAD_CHUNK)
            scores = q[:, hs].float() @ k_all[:, hs].float().transpose(-1, -2) * self.attn_scale  # (rows, h, T, N)
            mass[:, hs] = scores.softmax(-1).sum(2)
        spans = [(s.scale, s.start, s.length) for s in segments] + [(si, N - T, T)]
        for scale, start, length in spans:
            density = mass[:, :, start:start + length].sum(-1).mean().item() / length
            self.density_sum[layer, si, scale] += density * rows
            self.density_rows[layer, si, scale] += rows
        prev = next((s for s in segments if s.scale == si - 1), None)
        if prev is not None:
            sim = key_similarity(k_all[:, :, prev.start:prev.start + prev.length], k_all[:, :, N - T:],
                                 self.patch_nums[si - 1], self.patch_nums[si])
            self.sim_sum[layer, si] += sim * rows
            self.sim_rows[layer, si] += rows

    def density(self) -> torch.Tensor:
        """(layers, K, K) mean density; NaN where query scale j never saw key scale i."""
        return self.density_sum / self.density_rows  # 0/0 -> NaN

    def similarity(self) -> dict[int, dict[int, float]]:
        sims = self.sim_sum / self.sim_rows
        return {layer: {si: sims[layer, si].item() for si in range(sims.shape[1]) if self.sim_rows[layer, si] > 0}
                for layer in range(sims.shape[0])}


def online_test_scales(policy: AMSKVPolicy, patch_nums: tuple[int, ...]) -> tuple[int, ...]:
    """The scales at which online AMS-KV evaluates the similarity of a layer that never expands.

    Found by replaying the policy over token counts; these are the moments a layer's budget overflows.
    """
    online = OnlineAMSKVPolicy(policy.c_cds, policy.c_min, policy.c_max, policy.theta, policy.evict_newest)
    asked: set[int] = set()

    def oracle(layer: int, si: int) -> float:
        asked.add(si)
        return math.inf

    plan_kv(online, tuple(patch_nums), 1, oracle)
    return tuple(sorted(asked))


def layer_similarity(similarity: dict[int, dict[int, float]], depth: int, scales: tuple[int, ...]) -> list[float]:
    """Per layer, the mean similarity over ``scales`` (all measured scales when none of them was measured)."""
    out = []
    for layer in range(depth):
        by_scale = similarity.get(layer, {})
        values = [by_scale[s] for s in scales if s in by_scale] or list(by_scale.values())
        out.append(sum(values) / len(values) if values else math.inf)
    return out


def theta_for_fraction(values: list[float], fraction: float) -> float:
    """A threshold with ``round(fraction * layers)`` values strictly below it (fewer when values tie)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"target fraction must be in [0, 1], got {fraction}")
    ordered = sorted(values)
    k = round(fraction * len(ordered))
    if k == 0:
        return ordered[0]
    if k == len(ordered):
        return math.nextafter(ordered[-1], math.inf)
    return (ordered[k - 1] + ordered[k]) / 2


def calibrate(similarity: dict[int, dict[int, float]], depth: int, policy: AMSKVPolicy, patch_nums,
              theta: float | None = None, target_fraction: float | None = None, model: str = "",
              samples: int = 0) -> CalibrationProfile:
    """Flag a layer demanding when its similarity at the online test scales is below theta.

    ``target_fraction`` picks theta so that fraction of layers is demanding; otherwise ``theta``
    (default: the policy's own) is used as given.
    """
    scales = online_test_scales(policy, patch_nums)
    per_layer = layer_similarity(similarity, depth, scales)
    if target_fraction is not None:
        theta = theta_for_fraction(per_layer, target_fraction)
    elif theta is None:
        theta = policy.theta
    return CalibrationProfile(
        demanding=tuple(v < theta for v in per_layer), model=model, theta=theta, target_fraction=target_fraction,
        similarity=similarity, layer_similarity=tuple(per_layer), test_scales=scales,
        policy={"c_cds": policy.c_cds, "c_min": policy.c_min, "c_max": policy.c_max}, samples=samples,
    )


@dataclass
class AnalysisResult:
    model: str
    policy: str
    patch_nums: tuple[int, ...]
    samples: int
    density_per_layer: torch.Tensor  # (layers, K, K) [layer, query j, key i]
    similarity: dict[int, dict[int, float]]
    visibility: torch.Tensor  # (layers, K): share of later query scales that see key scale i under the policy
    kept_after_scale: list = field(default_factory=list)  # per batch: [scale][layer] -> kept scales
    expansions: list = field(default_factory=list)  # per batch: {layer: scale}
    kv_allocated_bytes: list = field(default_factory=list)
    kv_peak_stored_bytes: list = field(default_factory=list)

    @property
    def density(self) -> torch.Tensor:
        """(K, K) density averaged over layers (heads, rows and samples are averaged already)."""
        return self.density_per_layer.mean(0)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "policy": self.policy, "patch_nums": list(self.patch_nums),
            "samples": self.samples,
            "density": _listed(self.density), "density_per_layer": _listed(self.density_per_layer),
            "similarity": {str(layer): {str(si): v for si, v in by.items()} for layer, by in self.similarity.items()},
            "visibility": _listed(self.visibility), "kept_after_scale": self.kept_after_scale,
            "expansions": [{str(k): v for k, v in e.items()} for e in self.expansions],
            "kv_allocated_bytes": self.kv_allocated_bytes, "kv_peak_stored_bytes": self.kv_peak_stored_bytes,
        }


def _listed(t: torch.Tensor):
    """Nested lists with NaN as null (JSON has no NaN)."""
    if t.dim() == 0:
        v = t.item()
        return None if math.isnan(v) else v
    return [_listed(x) for x in t]


def visibility(kept_after_scale: list, depth: int, num_scales: int) -> torch.Tensor:
    """(layers, K): for key scale i, the share of query scales j > i that found i in the layer's cache."""
    seen = torch.zeros(depth, num_scales, dtype=torch.float64)
    for j in range(1, num_scales):
        for layer, kept in enumerate(kept_after_scale[j - 1]):
            for i in kept:
                seen[layer, i] += 1
    later = torch.tensor([num_scales - 1 - i for i in range(num_scales)], dtype=torch.float64)
    return seen / later  # last scale: 0/0 -> NaN, no later query exists


def analyze(engine, labels: list[int], seeds: list[int], params, batch: int,
            progress: Callable[[int], None] | None = None) -> AnalysisResult:
    """Density and similarity under ``full``, kept scales under ``engine.policy``, in batches of ``batch``.

    ``progress(images)`` is called after each batch with the number of images it analysed.
    """
    cfg = engine.config
    full = engine.with_policy("full")
    observer = AttentionObserver(cfg.depth, cfg.patch_nums, float(engine.var.block_list[0].attn.scale))
    vis_sum = torch.zeros(cfg.depth, cfg.num_scales, dtype=torch.float64)
    result = AnalysisResult(engine.model_name, engine.policy.describe(), cfg.patch_nums, len(labels),
                            torch.empty(0), {}, torch.empty(0))
    for start in range(0, len(labels), batch):
        chunk = slice(start, start + batch)
        full.generate_tokens(labels[chunk], seeds[chunk], params, observer=observer)
        run = engine.generate_tokens(labels[chunk], seeds[chunk], params)
        n = len(labels[chunk])
        vis_sum += visibility(run.kept_after_scale, cfg.depth, cfg.num_scales) * n
        result.kept_after_scale.append(run.kept_after_scale)
        result.expansions.append(dict(run.expansions))
        result.kv_allocated_bytes.append(run.kv_allocated_bytes)
        result.kv_peak_stored_bytes.append(run.kv_peak_stored_bytes)
        if progress is not None:
            progress(n)
    result.density_per_layer = observer.density()
    result.similarity = observer.similarity()
    result.visibility = vis_sum / len(labels)
    return result


def write_heatmaps(result: AnalysisResult, out_dir: str | Path,
                   profile: CalibrationProfile | None = None) -> list[Path]:
    """density.png, similarity.png, kept.png; returns their paths."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pn = list(result.patch_nums)
    K, depth = len(pn), result.density_per_layer.shape[0]
    labels = [f"{p}x{p}" for p in pn]
    paths = []

    def save(fig, name):
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)

    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    dens = result.density.numpy()
    finite = dens[dens == dens]
    norm = LogNorm(vmin=max(finite.min(), 1e-6), vmax=finite.max()) if finite.size else None
    im = ax.imshow(dens, cmap="viridis", norm=norm)
    ax.set(title=f"attention density d(i<-j), mean over {depth} layers", xlabel="key scale i", ylabel="query scale j",
           xticks=range(K), yticks=range(K))
    ax.set_xticklabels(labels, rotation=90)
    ax.set_yticklabels(labels)
    fig.colorbar(im, ax=ax)
    save(fig, "density.png")

    fig = Figure(figsize=(max(5.0, 0.6 * K + 2), max(3.0, 0.25 * depth + 1.5)))
    ax = fig.subplots()
    sims = torch.full((depth, K), math.nan)
    for layer, by_scale in result.similarity.items():
        for si, v in by_scale.items():
            sims[layer, si] = v
    im = ax.imshow(sims.numpy(), cmap="magma", aspect="auto")
    title = "inter-scale key similarity (cosine, resized previous scale)"
    if profile is not None:
        title += f"\ntheta={profile.theta:.4g}, demanding layers: {[i for i, d in enumerate(profile.demanding) if d]}"
        for si in profile.test_scales:
            ax.axvline(si, color="cyan", linewidth=0.8, linestyle="--")
    ax.set(title=title, xlabel="scale", ylabel="layer", xticks=range(K), yticks=range(depth))
    ax.set_xticklabels(labels, rotation=90)
    fig.colorbar(im, ax=ax)
    save(fig, "similarity.png")

    fig = Figure(figsize=(max(5.0, 0.6 * K + 2), max(3.0, 0.25 * depth + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(result.visibility.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set(title=f"{result.policy}: share of later scales that see each scale", xlabel="key scale", ylabel="layer",
           xticks=range(K), yticks=range(depth))
    ax.set_xticklabels(labels, rotation=90)
    fig.colorbar(im, ax=ax)
    save(fig, "kept.png")
    return paths
