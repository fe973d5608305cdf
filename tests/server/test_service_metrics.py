"""server.metrics: the metric set the service exports, linted by the real `promtool check metrics`.

(Named test_service_metrics.py, not test_metrics.py: tests/amskv_tools/demo/test_metrics.py already owns that
basename and the test tree has no __init__.py files, so a second one breaks collection.)
"""
from __future__ import annotations

import re
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from tests.tools import find_tool

# name in code -> (exported family name, type, label names), as the server code relies on them.
EXPECTED = {
    "REQUESTS": ("amskv_requests", "counter", ("endpoint", "status")),
    "IMAGES_GENERATED": ("amskv_images_generated", "counter", ("model",)),
    "REJECTED": ("amskv_requests_rejected", "counter", ("reason",)),
    "CANCELLED": ("amskv_requests_cancelled", "counter", ("stage",)),
    "TIMED_OUT": ("amskv_requests_timed_out", "counter", ("stage",)),
    "BATCH_FAILURES": ("amskv_batch_failures", "counter", ("reason",)),
    "OOM": ("amskv_oom", "counter", ()),
    "BATCH_SPLITS": ("amskv_batch_splits", "counter", ()),
    "QUEUE_REQUESTS": ("amskv_queue_requests", "gauge", ()),
    "QUEUE_IMAGES": ("amskv_queue_images", "gauge", ()),
    "BATCH_RUNNING": ("amskv_batch_running_images", "gauge", ()),
    "BATCH_MAX": ("amskv_batch_max_images", "gauge", ()),
    "KV_BUDGET": ("amskv_kv_cache_budget_bytes", "gauge", ()),
    "KV_USED": ("amskv_kv_cache_used_bytes", "gauge", ()),
    "KV_PER_IMAGE": ("amskv_kv_cache_bytes_per_image", "gauge", ("model",)),
    "KV_VANILLA_PER_IMAGE": ("amskv_kv_cache_vanilla_bytes_per_image", "gauge", ("model",)),
    "KV_REDUCTION": ("amskv_kv_cache_reduction_ratio", "gauge", ()),
    "KV_USAGE_RATIO": ("amskv_kv_cache_usage_ratio", "gauge", ()),
    "KV_RESERVED": ("amskv_kv_cache_reserved_bytes", "gauge", ()),
    "KV_ACTIVATION_RESERVE": ("amskv_kv_cache_activation_reserve_bytes", "gauge", ()),
    "KV_POOL_IMAGES": ("amskv_kv_cache_pool_images", "gauge", ()),
    "BATCH_CAP": ("amskv_batch_cap_images", "gauge", ()),
    "KV_REFUSED_EXPANSIONS": ("amskv_kv_cache_refused_expansions", "counter", ()),
    "STEP_IMAGES": ("amskv_step_images", "histogram", ()),
    "STEP_TOKENS": ("amskv_step_tokens", "histogram", ()),
    "STEP_DURATION": ("amskv_step_duration_seconds", "histogram", ()),
    "SCALE_IMAGES": ("amskv_scale_images", "counter", ("scale",)),
    "IMAGES_ADMITTED": ("amskv_images_admitted", "counter", ()),
    "IMAGES_CANCELLED": ("amskv_images_cancelled", "counter", ()),
    "FIRST_PREVIEW": ("amskv_time_to_first_preview_seconds", "histogram", ()),
    "SLOTS_FREE": ("amskv_kv_cache_free_images", "gauge", ()),
    "KV_PROFILE": ("amskv_kv_profile_info", "gauge", ("source",)),
    "KV_PROFILE_DEMANDING_LAYERS": ("amskv_kv_profile_demanding_layers", "gauge", ()),
    "KV_PROFILE_THETA": ("amskv_kv_profile_theta", "gauge", ()),
    "READY": ("amskv_ready", "gauge", ()),
    "DRAINING": ("amskv_draining", "gauge", ()),
    "BUILD_INFO": ("amskv_build_info", "gauge", ("version", "model", "policy", "dtype", "device")),
    "REQUEST_DURATION": ("amskv_request_duration_seconds", "histogram", ("endpoint",)),
    "QUEUE_WAIT": ("amskv_queue_wait_seconds", "histogram", ()),
    "BATCH_DURATION": ("amskv_batch_duration_seconds", "histogram", ("stage",)),
    "SCALE_DURATION": ("amskv_scale_duration_seconds", "histogram", ("scale",)),
    "BATCH_SIZE": ("amskv_batch_size_images", "histogram", ()),
    "REQUEST_IMAGES": ("amskv_request_images", "histogram", ()),
}
# Unbounded values must never become labels (one series per class/seed/request).
FORBIDDEN_LABEL = re.compile(r"class|seed|request_?id|^id$|client|user|prompt", re.IGNORECASE)
IMAGE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]




def touch_every_metric() -> None:
    """Give every metric at least one sample, the way the service would during normal work."""
    metrics.REQUESTS.labels(endpoint="/generate", status="200").inc()
    metrics.IMAGES_GENERATED.labels(model="var-d16").inc(2)
    for reason in metrics.REJECT_REASONS:
        metrics.REJECTED.labels(reason=reason).inc()
    metrics.CANCELLED.labels(stage="queued").inc()
    metrics.TIMED_OUT.labels(stage="queued").inc()
    metrics.BATCH_FAILURES.labels(reason="oom").inc()
    metrics.OOM.inc()
    metrics.BATCH_SPLITS.inc()
    metrics.QUEUE_REQUESTS.set(3)
    metrics.QUEUE_IMAGES.set(12)
    metrics.BATCH_RUNNING.set(8)
    metrics.BATCH_MAX.set(64)
    metrics.KV_BUDGET.set(2**30)
    metrics.KV_USED.set(2**29)
    metrics.KV_PER_IMAGE.labels(model="var-d16").set(4e6)
    metrics.KV_VANILLA_PER_IMAGE.labels(model="var-d16").set(1e7)
    metrics.KV_REDUCTION.set(0.6)
    metrics.KV_USAGE_RATIO.set(0.5)
    metrics.KV_REFUSED_EXPANSIONS.inc()
    metrics.STEP_IMAGES.observe(8)
    metrics.STEP_TOKENS.observe(512)
    metrics.STEP_DURATION.observe(0.05)
    metrics.SCALE_IMAGES.labels(scale="0").inc(8)
    metrics.IMAGES_ADMITTED.inc(8)
    metrics.IMAGES_CANCELLED.inc(1)
    metrics.FIRST_PREVIEW.observe(0.02)
    metrics.SLOTS_FREE.set(56)
    metrics.set_kv_profile("calibrated", 3, 0.71)
    metrics.KV_RESERVED.set(2**28)
    metrics.KV_ACTIVATION_RESERVE.set(2**20)
    metrics.KV_POOL_IMAGES.set(64)
    metrics.BATCH_CAP.set(64)
    metrics.READY.set(1)
    metrics.DRAINING.set(0)
    metrics.set_build_info("0.1.0", "var-d16", "amskv", "bf16", "cuda")
    metrics.REQUEST_DURATION.labels(endpoint="/generate").observe(0.7)
    metrics.QUEUE_WAIT.observe(0.003)
    metrics.BATCH_DURATION.labels(stage="ar").observe(0.4)
    metrics.BATCH_DURATION.labels(stage="decode").observe(0.1)
    metrics.BATCH_SIZE.observe(8)
    metrics.REQUEST_IMAGES.observe(2)


def exported_families() -> dict:
    touch_every_metric()
    body, _ = metrics.render()
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def test_exposition_passes_promtool_lint():
    promtool = find_tool("promtool")
    touch_every_metric()
    body, _ = metrics.render()
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_promtool_lint_rejects_a_bad_exposition():
    # Negative control: proves the binary found really lints (a stand-in exiting 0 would pass the test above).
    promtool = find_tool("promtool")
    bad = b"# TYPE amskv_requests counter\namskv_requests 1\n"
    result = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, timeout=60)
    assert result.returncode != 0
    assert b"_total" in result.stdout + result.stderr


@pytest.mark.parametrize("attribute", sorted(EXPECTED))
def test_required_metric_is_exported_with_its_type_and_labels(attribute):
    family_name, kind, labels = EXPECTED[attribute]
    metric = getattr(metrics, attribute)
    assert metric._name == family_name
    assert metric._type == kind
    assert tuple(metric._labelnames) == labels
    assert family_name in exported_families()


def test_no_label_carries_unbounded_values():
    labels = {label for _, _, names in EXPECTED.values() for label in names}
    for family in exported_families().values():
        for sample in family.samples:
            labels.update(sample.labels)
    labels.discard("le")  # histogram bucket bound, added by the client
    assert labels and not [label for label in labels if FORBIDDEN_LABEL.search(label)]


def test_no_created_series_and_process_metrics_present():
    families = exported_families()
    samples = [sample.name for family in families.values() for sample in family.samples]
    assert not [name for name in samples if name.endswith("_created")]
    assert "process_cpu_seconds" in families  # ProcessCollector is on the dedicated registry


def test_image_count_histograms_use_the_batch_size_buckets():
    families = exported_families()
    for name in ("amskv_batch_size_images", "amskv_request_images"):
        bounds = [float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")]
        assert bounds == [float(b) for b in IMAGE_BUCKETS] + [float("inf")]


def test_request_duration_reaches_minutes():
    bounds = metrics.REQUEST_DURATION.labels(endpoint="/generate")._upper_bounds
    assert bounds[-2] >= 300  # last finite bucket; the client default (10 s) would lump every batch of 256


def test_build_info_keeps_only_the_latest_configuration():
    metrics.set_build_info("0.1.0", "var-d16", "amskv", "bf16", "cuda")
    metrics.set_build_info("0.1.0", "demo", "vanilla", "fp32", "cpu")
    body, _ = metrics.render()
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    samples = families["amskv_build_info"].samples
    assert len(samples) == 1
    assert samples[0].value == 1
    assert samples[0].labels == {
        "version": "0.1.0", "model": "demo", "policy": "vanilla", "dtype": "fp32", "device": "cpu",
    }


def test_render_returns_text_format_content_type():
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE amskv_queue_images gauge" in body


def test_enum_labelled_counters_start_at_zero():
    # Pre-initialised so alert rules built on increase() see the first event.
    families = exported_families()
    reasons = {s.labels["reason"] for s in families["amskv_requests_rejected"].samples}
    assert reasons == set(metrics.REJECT_REASONS)
    failure_reasons = {s.labels["reason"] for s in families["amskv_batch_failures"].samples}
    assert failure_reasons == {"error", "oom"}
