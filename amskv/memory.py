"""Exact KV memory arithmetic: a pure function of (model config, policy, batch, dtype, CFG).

It replays the policy over token counts in the same order a generation runs (scale by scale,
layer by layer), so its figures equal the bytes ``amskv.kvcache.storage.KVCache`` allocates and holds.
Per image counts K and V of both CFG rows.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from amskv.config import MAX_IMAGES, VARConfig
from amskv.kvcache.policy import AMSKVPolicy, KVPolicy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

SimilarityOracle = Callable[[int, int], float]  # (layer, scale) -> similarity


def all_demanding(layer: int, si: int) -> float:
    """The worst case of the online test: every layer expands at its first overflow."""
    return -math.inf


def never_demanding(layer: int, si: int) -> float:
    return math.inf


@dataclass(frozen=True)
class KVPlan:
    """Token counts per layer and sequence: what a batch must allocate and what it will hold."""

    capacities: tuple[int, ...]  # per-layer buffer = the most tokens the layer ever keeps
    workspace_tokens: int  # shared scratch for [kept + current] when it exceeds a layer buffer
    working_set: tuple[int, ...]  # per layer, max over scales of kept + current tokens
    peak_stored_tokens: int  # max over the run of the tokens kept by all layers together
    kept: tuple[tuple[tuple[int, ...], ...], ...]  # [scale][layer] -> kept scale indices after the scale
    expanded_at: dict[int, int] = field(default_factory=dict)

    @property
    def allocated_tokens(self) -> int:
        return sum(self.capacities) + self.workspace_tokens


def plan_kv(policy: KVPolicy, patch_nums: tuple[int, ...], depth: int,
            similarity: SimilarityOracle | None = None) -> KVPlan:
    """Replay the policy over token counts. Without an oracle: the policy's own plan (an online AMS-KV
    policy with a profile plans the profile's expansions), else the worst case (every layer expands)."""
    similarity = similarity or policy.plan_oracle() or all_demanding
    scale_tokens = tuple(p * p for p in patch_nums)
    states = [policy.init_layer(layer) for layer in range(depth)]
    stored = [0] * depth
    capacities, working = [0] * depth, [0] * depth
    peak_sum, kept_log = 0, []
    for si, T in enumerate(scale_tokens):
        for layer in range(depth):
            n = stored[layer]
            working[layer] = max(working[layer], n + T)
            policy.decide(states[layer], layer, si, scale_tokens, functools.partial(similarity, layer, si))
            stored[layer] = sum(scale_tokens[s] for s in states[layer].kept)
            capacities[layer] = max(capacities[layer], stored[layer])
            peak_sum = max(peak_sum, sum(stored))
        kept_log.append(tuple(tuple(s.kept) for s in states))
    placed, workspace = _place_working_sets(capacities, working)
    expanded = {i: s.expanded_at for i, s in enumerate(states) if s.expanded_at is not None}
    return KVPlan(placed, workspace, tuple(working), peak_sum, tuple(kept_log), expanded)


def _place_working_sets(kept_peak: list[int], working: list[int]) -> tuple[tuple[int, ...], int]:
    """Choose, per layer, between a buffer big enough to attend in place (its working-set peak) and a
    buffer for what it keeps plus the shared workspace. The workspace pays off once several layers
    share it (deep models); a shallow model attends in place. Returns (capacities, workspace tokens)
    minimising their sum; on a tie, the smaller workspace (fewer copies)."""
    needs = sorted({w for k, w in zip(kept_peak, working, strict=True) if w > k})
    best = None
    for ws in [0] + needs:
        caps = tuple(k if w <= k or w <= ws else w for k, w in zip(kept_peak, working, strict=True))
        total = sum(caps) + ws
        if best is None or total < best[0]:
            best = (total, caps, ws)
    assert best is not None  # the loop ran at least once (ws = 0 is always a candidate)
    return best[1], best[2]


def fraction_flags(depth: int, fraction: float) -> str:
    """Per-layer flags with round(fraction x depth) demanding layers. Which layers does not matter for
    memory (every layer has the same width), so the first ones are flagged."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--demanding-fraction must be between 0 and 1, got {fraction}")
    count = round(fraction * depth)
    return "1" * count + "0" * (depth - count)


def token_bytes(cfg: VARConfig, batch: int, dtype: torch.dtype, cfg_rows: int = 2) -> int:
    """K and V of one token position for the whole batch (CFG doubles the rows)."""
    return 2 * cfg_rows * batch * cfg.embed_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class KVMemory:
    policy: str
    batch: int
    dtype: str
    allocated_bytes: int  # what the storage allocates: layer buffers + workspace
    peak_stored_bytes: int  # the most the cache holds at once (the paper's "KV cache")
    workspace_bytes: int
    per_layer_bytes: tuple[int, ...]
    per_layer_working_set_bytes: tuple[int, ...]  # peak attention working set (kept + current)
    peak_working_set_bytes: int  # the largest per-layer working set (one layer attends at a time)

    @property
    def bytes_per_image(self) -> int:
        return self.allocated_bytes // self.batch

    def to_dict(self) -> dict:
        return {
            "policy": self.policy, "batch": self.batch, "dtype": self.dtype,
            "allocated_bytes": self.allocated_bytes, "peak_stored_bytes": self.peak_stored_bytes,
            "workspace_bytes": self.workspace_bytes, "bytes_per_image": self.bytes_per_image,
            "per_layer_bytes": list(self.per_layer_bytes),
            "per_layer_working_set_bytes": list(self.per_layer_working_set_bytes),
            "peak_working_set_bytes": self.peak_working_set_bytes,
        }


def kv_memory(cfg: VARConfig, policy: KVPolicy, batch: int, dtype: torch.dtype | str = torch.bfloat16,
              cfg_rows: int = 2, similarity: SimilarityOracle | None = None) -> KVMemory:
    """KV bytes for ``batch`` images. For online ``amskv`` the default oracle gives the worst case (or, with
    a profile, the profile's plan: an expansion beyond it is allocated on the spot and is not counted here);
    an ``amskv-static`` policy (per-layer flags) needs no oracle: its figure is exact before the batch runs."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    plan = plan_kv(policy, cfg.patch_nums, cfg.depth, similarity)
    tb = token_bytes(cfg, batch, dtype, cfg_rows)
    name = next(k for k, v in DTYPES.items() if v == dtype)
    return KVMemory(
        policy=policy.describe(), batch=batch, dtype=name,
        allocated_bytes=plan.allocated_tokens * tb, peak_stored_bytes=plan.peak_stored_tokens * tb,
        workspace_bytes=plan.workspace_tokens * tb,
        per_layer_bytes=tuple(c * tb for c in plan.capacities),
        per_layer_working_set_bytes=tuple(w * tb for w in plan.working_set),
        peak_working_set_bytes=max(plan.working_set) * tb,
    )


def kv_bytes_per_image(cfg: VARConfig, policy: KVPolicy, dtype=torch.bfloat16, cfg_rows: int = 2) -> int:
    return kv_memory(cfg, policy, 1, dtype, cfg_rows).allocated_bytes


def max_batch(budget_bytes: int, bytes_per_image: int, cap: int = MAX_IMAGES) -> int:
    """Admissible images for a KV budget: 0 when not even one image fits."""
    if bytes_per_image <= 0:
        return cap
    return max(0, min(cap, budget_bytes // bytes_per_image))


def static_and_worst(cfg: VARConfig, policy: KVPolicy, batch: int, dtype, cfg_rows: int = 2) -> dict:
    """For AMS-KV: the worst case under online expansion, the case where no layer expands, and (for a
    static profile) the exact figure. Other policies have one figure."""
    out = {"worst_case": kv_memory(cfg, policy, batch, dtype, cfg_rows, all_demanding).to_dict()}
    if isinstance(policy, AMSKVPolicy):
        if policy.demanding is None:
            out["no_expansion"] = kv_memory(cfg, policy, batch, dtype, cfg_rows, never_demanding).to_dict()
        else:  # per-layer flags ignore the oracle: the one figure is exact
            out["exact"] = out["worst_case"]
    return out
