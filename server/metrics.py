"""Every Prometheus metric of the amskv service, defined once.

The service runs one uvicorn worker (the GPU batcher must live in one process), so a single
in-process registry is correct and multiprocess mode is not needed. The registry is our own
``REGISTRY`` rather than the library default, so importing a third-party module that registers
metrics globally cannot leak series into ``/metrics`` and tests can render the exposition in isolation.

Naming follows the Prometheus practices: prefix ``amskv_``, base units (seconds, bytes, 0..1 ratios),
counters end in ``_total``. Labels are small closed enums only; never a class label, seed or request id.
"""
from __future__ import annotations

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from amskv.calibration import PROFILE_SOURCES
from amskv.engine import EngineInfo

# The `_created` series double the number of series per counter/histogram and no dashboard uses them
# (same effect as PROMETHEUS_DISABLE_CREATED_SERIES=True). Must run before any metric is created.
prometheus_client.disable_created_metrics()

# generate_latest() with its default escaping writes the classic 0.0.4 text format; newer clients label
# it "version=1.0.0", which older Prometheus servers and scrapers do not know, so state what we emit.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Closed label value sets, exported so callers and tests can pre-initialise or validate them.
REJECT_REASONS = ("queue_full", "too_many_images", "draining", "invalid", "not_ready", "body_too_large",
                  "unsupported_media_type")
# The error code a refused request is answered with -> its reason; any other 4xx code is "invalid".
# server/errors.py counts every refusal through reject_reason (worker_dead: not ready to serve, for good).
REJECT_REASON_BY_CODE = {"queue_full": "queue_full", "too_many_images": "too_many_images", "draining": "draining",
                         "not_ready": "not_ready", "worker_dead": "not_ready", "body_too_large": "body_too_large",
                         "unsupported_media_type": "unsupported_media_type"}
# The two paths of the generate endpoint (the `endpoint` label of the request metrics).
GENERATE_ENDPOINTS = ("/v1/generate", "/generate", "/v1/images/generations")  # the last: OpenAI's Images API
CANCEL_STAGES = ("queued", "running")
TIMEOUT_STAGES = ("queued", "running")
FAILURE_REASONS = ("error", "oom")
BATCH_STAGES = ("ar", "decode")

# Bucket choices: an image request takes from ~0.05 s (the CPU demo model, one image)
# to minutes (a d30 batch of 256 behind a full queue); the library default stops at 10 s. Queue waits
# reach the 120 s request timeout; a stage of one batch spans a CPU demo decode (ms) to a d30 batch (~35 s+).
REQUEST_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90, 120, 180)
# One scale: from a fraction of a millisecond (the 1x1 scale of the CPU demo) to seconds (the 16x16 scale of
# d30 at batch 256).
SCALE_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
BATCH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# Powers of two plus 192: the batch sizes a compiled/graph-captured model would be padded to.
IMAGE_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256)

# --- counters ---------------------------------------------------------------------------------------
REQUESTS = Counter(
    "amskv_requests_total", "HTTP requests to the generate endpoints, by final status code.",
    ["endpoint", "status"], registry=REGISTRY,
)
IMAGES_GENERATED = Counter(
    "amskv_images_generated_total", "Images returned to clients.", ["model"], registry=REGISTRY,
)
REJECTED = Counter(
    "amskv_requests_rejected_total", "Requests refused before queueing, by reason.",
    ["reason"], registry=REGISTRY,
)
CANCELLED = Counter(
    "amskv_requests_cancelled_total", "Requests whose client disconnected, by the stage they were in.",
    ["stage"], registry=REGISTRY,
)
TIMED_OUT = Counter(
    "amskv_requests_timed_out_total", "Requests whose deadline expired, by the stage they were in.",
    ["stage"], registry=REGISTRY,
)
BATCH_FAILURES = Counter(
    "amskv_batch_failures_total", "Batches that raised instead of producing images, by reason.",
    ["reason"], registry=REGISTRY,
)
OOM = Counter(
    "amskv_oom_total", "Out-of-memory errors caught by the batcher.", registry=REGISTRY,
)
BATCH_SPLITS = Counter(
    "amskv_batch_splits_total", "Requests split across batches because they did not fit the free slots.",
    registry=REGISTRY,
)

# --- gauges -----------------------------------------------------------------------------------------
QUEUE_REQUESTS = Gauge("amskv_queue_requests", "Requests waiting in the queue.", registry=REGISTRY)
QUEUE_IMAGES = Gauge(
    "amskv_queue_images", "Images waiting in the queue (the admission unit).", registry=REGISTRY,
)
BATCH_RUNNING = Gauge(
    "amskv_batch_running_images", "Images running (holding a KV slot) at the latest scale boundary.", registry=REGISTRY,
)
BATCH_MAX = Gauge(
    "amskv_batch_max_images", "Images one step may run: the KV pool's slots after OOM back-off (and, on CUDA, the "
    "activations free memory holds).",
    registry=REGISTRY,
)
KV_BUDGET = Gauge(
    "amskv_kv_cache_budget_bytes",
    "Memory the KV-cache manager may use now (cpu: the configured budget; cuda: the pool plus free memory).",
    registry=REGISTRY,
)
KV_USED = Gauge(
    "amskv_kv_cache_used_bytes",
    "KV-cache bytes of the slots held by running images (their plan's peak), as of the latest step.", registry=REGISTRY,
)
KV_PER_IMAGE = Gauge(
    "amskv_kv_cache_bytes_per_image", "KV-cache bytes one image needs under the active policy.",
    ["model"], registry=REGISTRY,
)
KV_VANILLA_PER_IMAGE = Gauge(
    "amskv_kv_cache_vanilla_bytes_per_image",
    "KV-cache bytes one image would need with the original (vanilla) caching.",
    ["model"], registry=REGISTRY,
)
KV_REDUCTION = Gauge(
    "amskv_kv_cache_reduction_ratio", "1 - policy bytes per image / vanilla bytes per image (0..1).",
    registry=REGISTRY,
)
KV_USAGE_RATIO = Gauge(
    "amskv_kv_cache_usage_ratio",
    "KV bytes of the slots held by running images / the budget (0..1), as of the latest step.", registry=REGISTRY,
)
# The KV-cache manager's state (amskv/kvcache/manager.py KVState) and the calibration profile.
KV_RESERVED = Gauge(
    "amskv_kv_cache_reserved_bytes", "KV pool bytes allocated once at warm-up and reused by every batch.",
    registry=REGISTRY,
)
KV_ACTIVATION_RESERVE = Gauge(
    "amskv_kv_cache_activation_reserve_bytes",
    "Fixed activation memory measured at warm-up and held back from the budget (0 on the cpu).", registry=REGISTRY,
)
KV_DECODE_RESERVE = Gauge(
    "amskv_kv_cache_decode_reserve_bytes",
    "The decoder's activation peak (one fixed-size chunk) measured at warm-up and held back from the budget (0 on "
    "the cpu).", registry=REGISTRY,
)
BATCH_CAP = Gauge(
    "amskv_batch_cap_images",
    "Batch cap after OOM back-off; raised again after successful batches, at most the KV pool's images.",
    registry=REGISTRY,
)
KV_POOL_IMAGES = Gauge(
    "amskv_kv_cache_pool_images", "Images the preallocated KV pool holds (the largest admissible batch).",
    registry=REGISTRY,
)
KV_PROFILE = Gauge(
    "amskv_kv_profile_info", "The KV calibration profile's source; the value is 1 for the live source, else 0.",
    ["source"], registry=REGISTRY,
)
KV_PROFILE_DEMANDING_LAYERS = Gauge(
    "amskv_kv_profile_demanding_layers", "Layers whose KV cache is planned at c_max (cache-demanding).",
    registry=REGISTRY,
)
KV_PROFILE_THETA = Gauge(
    "amskv_kv_profile_theta", "The calibration profile's similarity threshold theta (NaN without a profile).",
    registry=REGISTRY,
)
LAST_BATCH_COMPLETED = Gauge(
    "amskv_last_batch_completed_timestamp_seconds",
    "Unix time the inference thread last finished an engine step, failed or not (the worker heartbeat; 0 before "
    "the first).",
    registry=REGISTRY,
)
BATCH_MAX_CONFIGURED = Gauge(
    "amskv_batch_max_configured_images", "AMSKV_MAX_BATCH: the most images one batch may hold by configuration.",
    registry=REGISTRY,
)
QUEUE_OLDEST_AGE = Gauge(
    "amskv_queue_oldest_age_seconds", "Seconds the longest-waiting queued request has waited (0 when empty).",
    registry=REGISTRY,
)
RUNNING_REQUESTS = Gauge(
    "amskv_running_requests", "Requests with images in the batch now on the device.", registry=REGISTRY,
)
DEVICE_MEMORY_RESERVED = Gauge(
    "amskv_device_memory_reserved_bytes",
    "Device memory torch's CUDA caching allocator holds, read at scrape (0 on the cpu).", registry=REGISTRY,
)
READY = Gauge("amskv_ready", "1 when the service accepts work (/readyz is 200), else 0.", registry=REGISTRY)
DRAINING = Gauge("amskv_draining", "1 while the service drains after SIGTERM, else 0.", registry=REGISTRY)
BUILD_INFO = Gauge(
    "amskv_build_info", "Build and configuration metadata; the value is always 1.",
    ["version", "model", "policy", "dtype", "device"], registry=REGISTRY,
)

# --- histograms -------------------------------------------------------------------------------------
REQUEST_DURATION = Histogram(
    "amskv_request_duration_seconds",
    "End-to-end duration of generate requests answered 2xx "
    "(rejections and errors are counted in amskv_requests_total).",
    ["endpoint"], buckets=REQUEST_DURATION_BUCKETS, registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "amskv_queue_wait_seconds", "Time from enqueue until the request's first image starts running.",
    buckets=QUEUE_WAIT_BUCKETS, registry=REGISTRY,
)
BATCH_DURATION = Histogram(
    "amskv_batch_duration_seconds", "Device time per batch, by stage.",
    ["stage"], buckets=BATCH_DURATION_BUCKETS, registry=REGISTRY,
)
SCALE_DURATION = Histogram(
    "amskv_scale_duration_seconds",
    "Wall time of one scale of a batch's autoregressive pass (all layers, sampling and the f-hat update), by "
    "scale index (0 = coarsest); on CUDA measured after a device synchronisation.",
    ["scale"], buckets=SCALE_DURATION_BUCKETS, registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "amskv_batch_size_images", "Images admitted together at one scale boundary (a batch); "
    "each image is counted once. amskv_step_images counts the images each step runs.",
    buckets=IMAGE_COUNT_BUCKETS, registry=REGISTRY,
)
REQUEST_IMAGES = Histogram(
    "amskv_request_images", "Images asked for per accepted request.",
    buckets=IMAGE_COUNT_BUCKETS, registry=REGISTRY,
)

# Iteration-level scheduling (amskv/scheduler.py): one step runs one scale for every running image.
STEP_IMAGES = Histogram(
    "amskv_step_images", "Images (rows) one engine step ran, whatever their scales.",
    buckets=IMAGE_COUNT_BUCKETS, registry=REGISTRY,
)
STEP_TOKENS = Histogram(
    "amskv_step_tokens", "Sequence tokens one engine step ran through the transformer (both CFG rows of every image).",
    buckets=(2, 8, 32, 128, 512, 2048, 8192, 32768, 131072, 348160), registry=REGISTRY,
)
STEP_DURATION = Histogram(
    "amskv_step_duration_seconds", "Wall time of one engine step (the scale of every running image, and the "
    "decode of the images it finished).", buckets=SCALE_DURATION_BUCKETS, registry=REGISTRY,
)
SCALE_IMAGES = Counter(
    "amskv_scale_images_total", "Images run at each scale, summed over steps (rows per scale).", ["scale"],
    registry=REGISTRY,
)
IMAGES_ADMITTED = Counter(
    "amskv_images_admitted_total", "Images admitted to the device (given a KV slot) at a scale boundary.",
    registry=REGISTRY,
)
IMAGES_CANCELLED = Counter(
    "amskv_images_cancelled_total", "Running images dropped at a scale boundary because their request was "
    "cancelled, timed out or failed; their KV slots came back at once.", registry=REGISTRY,
)
FIRST_PREVIEW = Histogram(
    "amskv_time_to_first_preview_seconds", "From a streamed request's arrival to its first preview image.",
    buckets=REQUEST_DURATION_BUCKETS, registry=REGISTRY,
)
KV_REFUSED_EXPANSIONS = Counter(
    "amskv_kv_cache_refused_expansions_total", "Online AMS-KV layer expansions that the KV slots had no room for "
    "(the profile did not plan them): the layer kept c_min, and no memory was allocated outside the pool.",
    registry=REGISTRY,
)
SLOTS_FREE = Gauge(
    "amskv_kv_cache_free_images", "Free KV slots: images that could be admitted at the next scale boundary.",
    registry=REGISTRY,
)

# Start the enum-labelled series at 0 so rate()/increase() in alerts see the first event instead of
# a series appearing from nowhere (which PromQL cannot turn into a rate).
for _reason in REJECT_REASONS:
    REJECTED.labels(reason=_reason)
for _stage in CANCEL_STAGES:
    CANCELLED.labels(stage=_stage)
for _stage in TIMEOUT_STAGES:
    TIMED_OUT.labels(stage=_stage)
for _reason in FAILURE_REASONS:
    BATCH_FAILURES.labels(reason=_reason)
for _stage in BATCH_STAGES:
    BATCH_DURATION.labels(stage=_stage)
for _source in PROFILE_SOURCES:
    KV_PROFILE.labels(source=_source)
for _endpoint in GENERATE_ENDPOINTS:
    REQUEST_DURATION.labels(endpoint=_endpoint)


def reject_reason(code: str, status: int) -> str | None:
    """The ``reason`` label of a request refused with this error code and status; None for a 5xx that is not
    a refusal (an internal error is counted by its status in amskv_requests_total only)."""
    if code in REJECT_REASON_BY_CODE:
        return REJECT_REASON_BY_CODE[code]
    return "invalid" if 400 <= status < 500 else None


def watch_service(max_batch: int, oldest_queued_age_s, running_requests, device_memory_bytes=None) -> None:
    """Bind the gauges read at scrape time to the live service (callables), and the configured batch cap."""
    BATCH_MAX_CONFIGURED.set(max_batch)
    QUEUE_OLDEST_AGE.set_function(oldest_queued_age_s)
    RUNNING_REQUESTS.set_function(running_requests)
    if device_memory_bytes is not None:
        DEVICE_MEMORY_RESERVED.set_function(device_memory_bytes)


def start_model_series(model: str) -> None:
    """Create the model-labelled series at 0 once the model's name is known (after the engine loaded)."""
    IMAGES_GENERATED.labels(model=model)
    KV_PER_IMAGE.labels(model=model)
    KV_VANILLA_PER_IMAGE.labels(model=model)


def set_kv_profile(source: str, demanding_layers: int, theta: float | None) -> None:
    """Publish the profile: one source series at 1 (the others at 0), the demanding-layer count and theta."""
    for name in PROFILE_SOURCES:
        KV_PROFILE.labels(source=name).set(1 if name == source else 0)
    KV_PROFILE_DEMANDING_LAYERS.set(demanding_layers)
    KV_PROFILE_THETA.set(float("nan") if theta is None else theta)


def start_model_info(info: EngineInfo) -> None:
    """What the loaded engine is: per-image KV figures, profile, per-scale series."""
    start_scale_series(len(info.scales))
    KV_PER_IMAGE.labels(model=info.model_name).set(info.kv_bytes_per_image)
    KV_VANILLA_PER_IMAGE.labels(model=info.model_name).set(info.vanilla_kv_bytes_per_image)
    if info.vanilla_kv_bytes_per_image:
        KV_REDUCTION.set(1 - info.kv_bytes_per_image / info.vanilla_kv_bytes_per_image)
    kv = info.kv_cache
    set_kv_profile(kv.profile_source, len(kv.demanding_layers), kv.theta)


def record_step(outcome, state) -> None:
    """The one place a step's stats become metrics (``outcome``: amskv.scheduler.StepOutcome; ``state``: the
    KV manager's KVState after the step)."""
    IMAGES_ADMITTED.inc(outcome.admitted)
    if outcome.admitted:
        BATCH_SIZE.observe(outcome.admitted)  # a batch: the images admitted together at one boundary
    IMAGES_CANCELLED.inc(outcome.cancelled)
    KV_REFUSED_EXPANSIONS.inc(outcome.refused_expansions)
    if outcome.out_of_memory:
        OOM.inc()
    if outcome.failed:
        BATCH_FAILURES.labels(reason="oom" if outcome.out_of_memory else "error").inc()
    if not outcome.rows:
        return
    STEP_IMAGES.observe(outcome.rows)
    STEP_DURATION.observe(outcome.seconds)
    if outcome.tokens:
        STEP_TOKENS.observe(outcome.tokens)
        BATCH_DURATION.labels(stage="ar").observe(outcome.seconds_ar)
        BATCH_DURATION.labels(stage="decode").observe(outcome.seconds_decode)
    for scale, images in outcome.rows_per_scale.items():
        SCALE_IMAGES.labels(scale=str(scale)).inc(images)
        SCALE_DURATION.labels(scale=str(scale)).observe(outcome.seconds_ar)
    KV_USED.set(state.used_bytes)
    if state.budget_bytes:
        KV_USAGE_RATIO.set(min(1.0, state.used_bytes / state.budget_bytes))


def publish_kv_state(state, room: int | None = None) -> None:
    """The KV-cache manager's state as gauges (``state`` is an amskv.kvcache.manager.KVState); ``room``: the
    images the scheduler may admit now."""
    KV_BUDGET.set(state.budget_bytes)
    KV_RESERVED.set(state.reserved_bytes)
    KV_ACTIVATION_RESERVE.set(state.activation_reserve_bytes)
    KV_DECODE_RESERVE.set(state.decode_reserve_bytes)
    KV_POOL_IMAGES.set(state.pool_images)
    BATCH_CAP.set(state.cap)
    BATCH_MAX.set(state.admissible)
    if room is not None:
        SLOTS_FREE.set(room)


def set_build_info(version: str, model: str, policy: str, dtype: str, device: str) -> None:
    """Publish the one build-info series; earlier values are dropped so only the live config shows."""
    BUILD_INFO.clear()
    BUILD_INFO.labels(version=version, model=model, policy=policy, dtype=dtype, device=device).set(1)


def render() -> tuple[bytes, str]:
    """The text exposition of ``REGISTRY`` and its content type, for the ``/metrics`` handler."""
    return generate_latest(REGISTRY), CONTENT_TYPE


def start_scale_series(num_scales: int) -> None:
    """The per-scale histogram's series at 0 once the model (and so its number of scales) is known."""
    for scale in range(num_scales):
        SCALE_DURATION.labels(scale=str(scale))
