"""Server settings: one pydantic-settings object read from AMSKV_* environment variables and CLI flags.

The library (`amskv/`) never reads the environment; everything it needs is passed from here.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from amskv.config import MAX_IMAGES as MAX_BATCH_CEILING  # the one ceiling, amskv.config.MAX_IMAGES
from amskv.kvcache.policy import DEFAULT_POLICY

GIB = 2**30


class Settings(BaseSettings):
    """Every knob of the server. Field names map to AMSKV_<NAME> environment variables."""

    model_config = SettingsConfigDict(env_prefix="AMSKV_", extra="ignore", validate_default=True)

    # Model.
    model: Literal["demo", "mnist64"] | None = Field(  # = amskv.config.BUNDLED_MODELS
        None, description="bundled model by name; None = demo unless checkpoint paths are given (never both)")
    var_checkpoint: str | None = Field(None, description="VAR checkpoint path; None = bundled default model")
    vae_checkpoint: str | None = Field(None, description="VQVAE checkpoint path; None = bundled default")
    policy: str = Field(DEFAULT_POLICY, min_length=1,
                        description="KV-cache policy name (amskv-static: batch-invariant, memory known up front)")
    policy_args: dict[str, Any] = Field(default_factory=dict, description="policy keyword arguments (env: JSON)")
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(None, description="None = fp32 on cpu, bf16 on cuda")
    device: Literal["cpu", "cuda", "auto"] = "auto"
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads; None = default")
    batch_invariant: Literal["auto", "tiles", "off"] = Field(
        "auto", description="auto: check at load which cheap GEMM form keeps an image bit-identical whatever its "
        "batch mates (fixed tiles where none does); tiles: always fixed 64-row tiles; off: plain GEMMs, fastest, "
        "an image may change in its last bits with its batch mates")

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(True, description="one structured log line per generate request (amskv.access); "
                             "false keeps the log quiet")
    max_body_bytes: int = Field(65536, ge=1024, description="largest accepted request body")
    # What idle, slow or half-open clients can hold (server/protocol.py adds the receipt deadline uvicorn lacks).
    limit_concurrency: int = Field(2048, ge=1, description="open connections + tasks before uvicorn answers 503")
    keepalive_timeout_s: float = Field(5.0, gt=0, le=3600, description="close an idle keep-alive connection, s")
    request_receive_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a request (headers and body) must arrive whole within this many seconds of "
        "the connection opening or the previous response ending, or it gets 408 and the connection closes "
        "(server/protocol.py; uvicorn itself has no header timeout)")

    # Batching and admission.
    scheduler: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: requests join and leave between scales; static: a new batch starts "
        "only when no image runs (the baseline)")
    max_batch: int = Field(MAX_BATCH_CEILING, ge=1, le=MAX_BATCH_CEILING)
    max_queue_delay_ms: float = Field(10.0, ge=0, le=60_000)
    max_queue_images: int = Field(1024, ge=1)
    max_images_per_request: int = Field(MAX_BATCH_CEILING, ge=1, le=MAX_BATCH_CEILING)
    request_timeout_s: float = Field(120.0, gt=0)
    # At least one full batch of the served model (docs/deploy.md, "Lifecycle timing"): d16 at 256 images
    # takes ~10 s on an H100-class GPU, d30 ~35 s; the compose and Kubernetes grace periods follow from it.
    drain_timeout_s: float = Field(60.0, ge=0)
    drain_notice_s: float = Field(
        0.0, ge=0, le=300, description="after SIGTERM, /readyz answers 503 this long while requests are still "
        "admitted, before the drain starts refusing them: a balancer's health checks take the replica out first "
        "(compose sets 3 s; Kubernetes uses its preStop sleep instead)")

    # Fatal states: the process exits non-zero so the restart policy or the liveness probe replaces it.
    load_timeout_s: float = Field(1800.0, gt=0, description="model load + calibration + warm-up must end in this")
    max_consecutive_failures: int = Field(3, ge=1, description="batches failing in a row before the process exits")
    worker_stall_timeout_s: float = Field(
        600.0, gt=0, description="one batch running longer than this makes /livez 503 and the process exit")
    fatal_exit_delay_s: float = Field(
        2.0, ge=0, le=300, description="after a fatal state, /livez is 503 this long before the process exits")

    # Memory.
    kv_budget_gib: float = Field(1.0, gt=0, description="KV budget on cpu, GiB")
    gpu_mem_fraction: float = Field(0.9, gt=0, le=1, description="share of free device memory for KV")
    oom_recover_batches: int = Field(8, ge=1, le=10_000,
                                     description="successful batches after an OOM before the batch cap doubles again")

    # KV calibration profile (docs/kv-cache.md §6).
    kv_profile: str = Field("auto", min_length=1, description="auto (calibrate at load, or reuse the cached "
                            "profile), off (no profile: every layer planned demanding), or a profile file path")
    kv_profile_cache_dir: str | None = Field(
        None, description="where calibrated profiles are cached; None = $XDG_CACHE_HOME/amskv/profiles "
        "(~/.cache/amskv/profiles)")
    calibration_images: int = Field(8, ge=1, le=256, description="images generated to calibrate a checkpoint")
    calibration_max_s: float = Field(60.0, gt=0, description="calibration stops after the batch that passes this")

    # Test-only fault injection; never enable in production.
    fault_injection: bool = False
    fault_load_delay_s: float = Field(0.0, ge=0, description="test-only, with AMSKV_FAULT_INJECTION=1: wait this "
                                      "long before loading (a slow start-up; stopping the server ends it)")

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.model is not None and (self.var_checkpoint or self.vae_checkpoint):
            raise ValueError(f"AMSKV_MODEL ({self.model}) and AMSKV_VAR_CHECKPOINT/AMSKV_VAE_CHECKPOINT exclude "
                             "each other: name a bundled model or give checkpoint paths, not both")
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) exceeds max_queue_images "
                f"({self.max_queue_images}); such a request could never be queued. Lower "
                "AMSKV_MAX_IMAGES_PER_REQUEST or raise AMSKV_MAX_QUEUE_IMAGES")
        return self

    def resolved_device(self, cuda_available: bool) -> str:
        if self.device == "auto":
            return "cuda" if cuda_available else "cpu"
        if self.device == "cuda" and not cuda_available:
            raise ValueError("AMSKV_DEVICE=cuda but torch sees no CUDA device; use cpu or auto")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bf16" if device == "cuda" else "fp32"

    @property
    def profile_cache_dir(self) -> Path:
        """The XDG base-directory rule: $XDG_CACHE_HOME when set and absolute, else ~/.cache."""
        if self.kv_profile_cache_dir:
            return Path(self.kv_profile_cache_dir).expanduser()
        from amskv.calibration import default_cache_dir

        return default_cache_dir(os.environ, Path.home())

    @property
    def cpu_kv_budget_bytes(self) -> int:
        return int(self.kv_budget_gib * GIB)


# AMSKV_* variables that tools and tests read, not the server: never reported as unknown.
OTHER_VARIABLES = frozenset({"AMSKV_ALERT_WEBHOOK_URL", "AMSKV_TOOLS_DIR", "AMSKV_TEST_THREADS", "AMSKV_UPDATE_DOCS"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per AMSKV_* variable that no setting reads, naming the closest setting: pydantic-settings ignores
    them (extra="ignore"), so a typo such as AMSKV_MAX_QUEUE_IMAGE=5 would otherwise change nothing, silently."""
    known = sorted(f"AMSKV_{name.upper()}" for name in Settings.model_fields)
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("AMSKV_") and upper not in known and upper not in OTHER_VARIABLES:
            close = difflib.get_close_matches(upper.removeprefix("AMSKV_"), [k.removeprefix("AMSKV_") for k in known],
                                              n=1, cutoff=0.7)  # without the shared prefix, which matches anything
            hint = f"; did you mean AMSKV_{close[0]}?" if close else ""
            lines.append(f"unknown setting {name} is ignored{hint}")
    return lines


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, named by its environment variable."""
    lines = []
    for err in exc.errors():
        name = "_".join(str(part) for part in err["loc"][:1]).upper()
        where = f"AMSKV_{name}" if name else "AMSKV_* settings"
        message = err["msg"].removeprefix("Value error, ")
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"invalid setting {where}: {message}{got}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
