"""The engine: a loaded VAR + VQVAE pair, a KV policy, and batched generation with memory figures.

This is the library's entry point for the CLI and the server. It never reads the environment.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from amskv.calibration import (
    AUTO,
    CalibrationSettings,
    KVCacheConfig,
    ProfileResolution,
    ProfileSource,
    describe,
    resolve_profile,
)
from amskv.config import BUNDLED_MODELS, VAR_PRESETS, VARConfig
from amskv.device import resolve_device
from amskv.generate import TokenResult, decode_images, decode_previews, generate_tokens, plan_pool
from amskv.kvcache.policy import DEFAULT_POLICY, AMSKVPolicy, KVPolicy, make_policy
from amskv.kvcache.profile import CalibrationProfile
from amskv.kvcache.storage import KVPool
from amskv.memory import DTYPES, KVMemory, kv_memory
from amskv.model.invariance_probe import Invariance
from amskv.model.invariance_probe import choose as choose_invariance
from amskv.model.loading import CheckpointError, load_pair
from amskv.model.var import VAR
from amskv.model.vqvae import VQVAE
from amskv.sampling import RowParams, SamplingParams
from amskv.step import Cohort, StepResult, new_cohort, run_step

logger = logging.getLogger(__name__)

DEFAULT_PARAMS = SamplingParams()  # frozen: one shared default is safe

DEFAULT_MODEL = "demo"
# Images per VQVAE decoder call (padded to this size, see decode_images). A GPU gains from batching the
# decoder; a CPU barely does, so there one image per call avoids decoding padding.
DECODE_CHUNK = {"cuda": 8, "cpu": 1}


def _weights_dir() -> Path:
    return Path(str(resources.files("amskv") / "weights"))


def bundled_files(model: str = DEFAULT_MODEL) -> tuple[str, str, str]:
    """(VAR, VQVAE, calibration profile) file names of a bundled model inside amskv/weights/."""
    if model not in BUNDLED_MODELS:
        raise ValueError(f"model must be one of {', '.join(BUNDLED_MODELS)}, got {model!r}")
    return f"{model}_var.pth", f"{model}_vae.pth", f"{model}_profile.json"


def bundled_checkpoints(model: str = DEFAULT_MODEL) -> tuple[Path, Path]:
    """The VAR and VQVAE files of a model shipped inside the package; CheckpointError names what is missing."""
    root = _weights_dir()
    var, vae = (root / name for name in bundled_files(model)[:2])
    missing = [path.name for path in (var, vae) if not path.is_file()]
    if missing and model == DEFAULT_MODEL:
        raise CheckpointError(f"the bundled demo model is missing from {root}; reinstall amskv or pass --var/--vae")
    if missing:  # a bundled model's weights removed from an installed package
        raise CheckpointError(f"the bundled model {model} is missing its weights ({' and '.join(missing)} "
                              f"missing from {root}; see docs/demo-model.md); use --model demo or pass --var/--vae")
    return var, vae


def bundled_profile(model: str = DEFAULT_MODEL) -> Path | None:
    """The shipped calibration profile of a bundled model, None when it has none."""
    profile = _weights_dir() / bundled_files(model)[2]
    return profile if profile.is_file() else None


def with_demo_profile(policy: str, policy_args: dict | None, model: str = DEFAULT_MODEL) -> dict:
    """``amskv-static`` on a bundled model uses that model's own calibration unless given flags or a profile."""
    profile = _weights_dir() / bundled_files(model)[2]
    if policy == "amskv-static" and profile.is_file() and not {"profile", "demanding"} & set(policy_args or {}):
        return {**(policy_args or {}), "profile": str(profile)}
    return dict(policy_args or {})


def model_name(cfg: VARConfig) -> str:
    for preset in VAR_PRESETS.values():
        p = preset.var
        if (p.depth, p.embed_dim, p.patch_nums, p.num_classes, p.vocab_size) == \
                (cfg.depth, cfg.embed_dim, cfg.patch_nums, cfg.num_classes, cfg.vocab_size):
            return preset.name
    return f"var-d{cfg.depth}-w{cfg.embed_dim}"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# on_preview(scale, rows, images): images are uint8 (len(rows), H, W, C) on the CPU, one per listed row.
PreviewCallback = Callable[[int, list, torch.Tensor], None]


@dataclass(frozen=True)
class KVCacheInfo:
    """The KV cache the engine runs with: its policy and where the calibration profile came from."""
    policy: str
    profile_source: ProfileSource  # calibrated, cached, file or none
    demanding_layers: tuple[int, ...]  # layers whose cache is planned at c_max
    theta: float | None  # the profile's similarity threshold; None without a profile
    bytes_per_image: int
    vanilla_bytes_per_image: int


@dataclass(frozen=True)
class EngineInfo:
    """What a loaded engine is: the one definition of the facts the server shows (/v1/models, metrics, logs)."""
    model_name: str
    num_classes: int
    resolution: int
    channels: int
    policy: str
    dtype: str  # fp32, bf16 or fp16
    device: str
    kv_bytes_per_image: int
    vanilla_kv_bytes_per_image: int
    vocab_size: int
    scales: tuple[int, ...]  # patch_nums: the side of each scale's token map
    kv_cache: KVCacheInfo
    batch_invariance: str = ""  # how GEMMs keep an image independent of its batch mates (Invariance.describe)


@dataclass
class GenerationResult:
    images: torch.Tensor  # uint8 (B, H, W, C) on the CPU
    tokens: list[torch.Tensor]  # per scale (B, pn*pn) int64, on the engine's device (no copy: few callers read them)
    kv_allocated_bytes: int
    kv_peak_stored_bytes: int
    seconds_ar: float
    seconds_decode: float
    scale_seconds: list[float] = field(default_factory=list)  # autoregressive wall time of each scale
    expansions: dict[int, int] = field(default_factory=dict)
    unplanned_expansions: list[int] = field(default_factory=list)  # expansions beyond the profile's plan


class Engine:
    def __init__(self, var: VAR, vae: VQVAE, policy: KVPolicy, dtype: torch.dtype, device: torch.device,
                 name: str | None = None, batch_invariant: str = "auto"):
        self.var, self.vae, self.policy = var, vae, policy
        self.dtype, self.device = dtype, device
        self.config = var.config
        self.model_name = name or model_name(var.config)
        self.num_classes = var.config.num_classes
        self.resolution = vae.config.resolution
        self.channels = vae.config.in_channels
        self.decode_chunk = DECODE_CHUNK.get(device.type, 8)
        self.profile_resolution = ProfileResolution(None, "none")
        # an image must not depend on its batch mates; auto checks at load which cheap GEMM form keeps rows
        # independent on this device (amskv/model/invariance_probe.py), off gives that up for speed
        self.invariance: Invariance = choose_invariance(var, vae, batch_invariant, device)
        logger.info("%s: batch invariance %s (chosen in %.2f s)", self.model_name, self.invariance.describe(),
                    self.invariance.seconds)

    @classmethod
    def load(cls, var_path: str | Path | None = None, vae_path: str | Path | None = None, *,
             policy: str = DEFAULT_POLICY, policy_args: dict | None = None, dtype: str = "fp32",
             device: str = "cpu", profile: str | Path = AUTO, profile_cache_dir: str | Path | None = None,
             calibration: CalibrationSettings | None = None, model: str | None = None,
             batch_invariant: str = "auto") -> Engine:
        """``None`` paths load a bundled model: ``model`` (demo or mnist64; default demo), never given with paths.
        Raises CheckpointError or ValueError on bad input.

        For ``amskv`` and ``amskv-static`` without ``profile=``/``demanding=`` policy arguments, ``profile``
        chooses the calibration profile: ``"auto"`` (the bundled demo's shipped file; otherwise the profile
        cached in ``profile_cache_dir`` for these checkpoints' contents, else a calibration now, written
        there when a directory is given), ``"off"`` (no profile: every layer is planned as demanding), or a
        profile file. ``engine.profile_resolution`` says which (docs/kv-cache.md §6).
        """
        if model is not None and (var_path is not None or vae_path is not None):
            raise ValueError(f"choose a bundled model by name (--model {model}) or give checkpoint paths "
                             "(--var/--vae), not both")
        if (var_path is None) != (vae_path is None):
            raise ValueError("give both --var and --vae, or neither for a bundled model")
        bundled = None
        if var_path is None or vae_path is None:
            model = model or DEFAULT_MODEL
            var_path, vae_path = bundled_checkpoints(model)
            bundled = Path(var_path).parent / bundled_files(model)[2]
        torch_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
        var, vae = load_pair(var_path, vae_path)
        policy_args = dict(policy_args or {})
        kv_policy = make_policy(policy, var.config.patch_nums, policy_args)  # validates the arguments first
        var.to(torch_device)
        vae.to(torch_device)
        if torch_dtype != torch.float32:  # the transformer blocks run in the low precision; embeddings,
            var.blocks.to(torch_dtype)  # the head, f_hat and the VQVAE stay in fp32
            if var.config.shared_aln:
                var.shared_ada_lin.to(torch_dtype)
        engine = cls(var, vae, kv_policy, torch_dtype, torch_device, batch_invariant=batch_invariant)
        if isinstance(kv_policy, AMSKVPolicy):
            kv = KVCacheConfig(policy, policy_args, profile, profile_cache_dir, calibration or CalibrationSettings())
            engine._attach_profile(kv, var_path, vae_path, bundled)
        return engine

    def _attach_profile(self, kv: KVCacheConfig, var_path: str | Path, vae_path: str | Path,
                        bundled: Path | None) -> None:
        self.profile_resolution = resolve_profile(kv, self, var_path, vae_path, bundled)
        found, depth = self.profile_resolution.profile, self.config.depth
        if found is not None:
            if found.depth != depth:
                raise ValueError(f"the calibration profile has {found.depth} layers but the model has {depth}")
            if "demanding" not in kv.policy_args:
                self.policy = make_policy(kv.policy, self.config.patch_nums,
                                          {k: v for k, v in kv.policy_args.items() if k != "profile"}, profile=found)
        logger.info("%s: %s", self.model_name, describe(self.profile_resolution))

    @property
    def profile(self) -> CalibrationProfile | None:
        return self.profile_resolution.profile

    def demanding_layers(self) -> list[int]:
        """Layers whose cache the allocation plans at c_max: the profile's flags; every layer under AMS-KV
        without a profile (the worst case); none for the other policies."""
        policy = self.policy
        if not isinstance(policy, AMSKVPolicy):
            return []
        flags = policy.demanding if policy.demanding is not None else policy.planned
        if flags is None:
            return list(range(self.config.depth))
        return [i for i in range(self.config.depth) if i < len(flags) and flags[i]]

    def info(self) -> EngineInfo:
        profile, per_image, vanilla = self.profile, self.kv_bytes_per_image(), self.vanilla_kv_bytes_per_image()
        kv_cache = KVCacheInfo(policy=self.policy_name, profile_source=self.profile_resolution.source,
                               demanding_layers=tuple(self.demanding_layers()),
                               theta=None if profile is None else profile.theta,
                               bytes_per_image=per_image, vanilla_bytes_per_image=vanilla)
        dtype = next(name for name, value in DTYPES.items() if value == self.dtype)
        return EngineInfo(model_name=self.model_name, num_classes=self.num_classes, resolution=self.resolution,
                          channels=self.channels, policy=self.policy_name, dtype=dtype, device=str(self.device),
                          kv_bytes_per_image=per_image, vanilla_kv_bytes_per_image=vanilla,
                          vocab_size=self.config.vocab_size, scales=tuple(self.config.patch_nums),
                          kv_cache=kv_cache, batch_invariance=self.invariance.describe())

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def with_policy(self, policy: str, policy_args: dict | None = None) -> Engine:
        """The same weights under another KV policy."""
        return Engine(self.var, self.vae, make_policy(policy, self.config.patch_nums, policy_args),
                      self.dtype, self.device, self.model_name, self.invariance.mode)

    def memory(self, batch: int) -> KVMemory:
        return kv_memory(self.config, self.policy, batch, self.dtype)

    def kv_bytes_per_image(self) -> int:
        return self.memory(1).allocated_bytes

    def vanilla_kv_bytes_per_image(self) -> int:
        return kv_memory(self.config, make_policy("vanilla", self.config.patch_nums), 1, self.dtype).allocated_bytes

    def new_pool(self, images: int) -> KVPool:
        """KV buffers for up to ``images`` images under this policy, for ``generate(..., pool=)`` to reuse."""
        return plan_pool(self.var, self.policy, images, self.var.blocks_dtype, self.device)

    @torch.inference_mode()
    def start_cohort(self, pool: KVPool, slot: int, labels: Sequence[int], seeds: Sequence[int],
                     params: Sequence[SamplingParams], tags: Sequence[Any],
                     previews: Sequence[Collection[int]] | None = None, order: int = 0) -> Cohort:
        """Images that will run in lockstep, one scale per ``step``, on KV slots ``slot .. slot + n`` of ``pool``."""
        params = self._validate(labels, seeds, params)
        lab = torch.tensor([int(c) for c in labels], dtype=torch.int64, device=self.device)
        sd = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=self.device)
        wanted = [frozenset(p) for p in previews] if previews is not None else [frozenset()] * len(lab)
        return new_cohort(self.var, self.policy, pool, slot, lab, sd, RowParams.stack(params, self.device),
                          list(tags), wanted, order)

    @torch.inference_mode()
    def step(self, cohorts: Sequence[Cohort]) -> StepResult:
        """One scale for every image of ``cohorts`` (each at its own scale); finished cohorts come back decoded."""
        return run_step(self.var, self.vae, list(cohorts), self.decode_chunk)

    def _validate(self, labels: Sequence[int], seeds: Sequence[int], params) -> list[SamplingParams]:
        if isinstance(params, SamplingParams):
            params = [params] * len(labels)
        if not (len(labels) == len(seeds) == len(params)) or not labels:
            raise ValueError("labels, seeds and params must be non-empty and of equal length")
        bad = [c for c in labels if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1}, got {bad[:5]}")
        if any(not 0 <= int(s) < 2**63 for s in seeds):
            raise ValueError("seeds must be in 0..2**63-1")
        return list(params)

    @torch.inference_mode()
    def generate_tokens(self, labels: Sequence[int], seeds: Sequence[int], params, observer=None,
                        pool: KVPool | None = None, on_scale=None):
        params = self._validate(labels, seeds, params)
        lab = torch.tensor([int(c) for c in labels], dtype=torch.int64, device=self.device)
        sd = torch.tensor([int(s) for s in seeds], dtype=torch.int64, device=self.device)
        return generate_tokens(self.var, self.vae, lab, sd, RowParams.stack(params, self.device), self.policy,
                               observer, pool, on_scale=on_scale)

    @torch.inference_mode()
    def generate(self, labels: Sequence[int], seeds: Sequence[int],
                 params: Sequence[SamplingParams] | SamplingParams = DEFAULT_PARAMS,
                 pool: KVPool | None = None, previews: Sequence[Collection[int]] | None = None,
                 on_preview: PreviewCallback | None = None) -> GenerationResult:
        """Image i depends only on (labels[i], seeds[i], params[i]). ``pool``: reuse its KV buffers.

        ``previews[i]``: the scales after which row i's running image is decoded and handed to
        ``on_preview(si, rows, images)`` (uint8 (len(rows), H, W, C)); rows without previews cost nothing.
        """
        on_scale = None
        if previews is not None and on_preview is not None and any(previews):
            on_scale = self._preview_hook(previews, on_preview)
        res = self.generate_tokens(labels, seeds, params, pool=pool, on_scale=on_scale)
        t0 = time.perf_counter()
        images = self.decode(res)
        return GenerationResult(images=images, tokens=res.tokens,
                                kv_allocated_bytes=res.kv_allocated_bytes,
                                kv_peak_stored_bytes=res.kv_peak_stored_bytes, seconds_ar=res.seconds,
                                seconds_decode=time.perf_counter() - t0, scale_seconds=res.scale_seconds,
                                expansions=res.expansions,
                                unplanned_expansions=res.unplanned_expansions)

    @torch.inference_mode()
    def decode(self, res: TokenResult) -> torch.Tensor:
        """``generate_tokens``' images, uint8 (B, H, W, C) on the CPU, ``decode_chunk`` images per decoder call:
        a fixed size, so the decoder's memory is a constant the KV manager budgets apart (measure_activations)."""
        exact = None if res.smooth_rows is None else ~res.smooth_rows  # rows decoded from their tokens
        return decode_images(self.vae, res.f_hat, res.tokens, exact, self.decode_chunk)

    def _preview_hook(self, previews: Sequence[Collection[int]], on_preview: PreviewCallback):
        wanted = [[row for row, scales in enumerate(previews) if si in scales] for si in range(self.config.num_scales)]

        def on_scale(si: int, f_hat: torch.Tensor) -> None:
            rows = wanted[si]
            if rows:
                index = torch.tensor(rows, dtype=torch.int64, device=f_hat.device)
                on_preview(si, rows, decode_previews(self.vae, f_hat.index_select(0, index)))
        return on_scale
