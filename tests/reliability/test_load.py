"""Load: 500 requests from 64 concurrent clients (scripts/loadgen.py) against the real server.

The queue is kept small so part of the load is refused: every request must end in 200 or in a 503
that carries Retry-After, nothing may be lost or hang, the server's own counters must agree with
what the clients saw, no queue slot may stay taken, and RSS must stay bounded after warm-up.
"""
from __future__ import annotations

import pytest

from tests.reliability.conftest import (assert_queue_empty, env_int, metric_series, metric_total,
                                        requests_with_status,
                                        rss_bytes, run_loadgen, start_server)

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

REQUESTS = env_int("RELIABILITY_LOAD_REQUESTS", 500)
CONCURRENCY = env_int("RELIABILITY_LOAD_CONCURRENCY", 64)
WARMUP_REQUESTS = 128
# 16 images per batch + 32 queued < 64 clients: a steady share of the load meets a full queue.
LOAD_ENV = {"AMSKV_MAX_BATCH": "16", "AMSKV_MAX_QUEUE_IMAGES": "32", "AMSKV_MAX_IMAGES_PER_REQUEST": "1",
            "AMSKV_MAX_QUEUE_DELAY_MS": "10"}
# Growth allowed between the end of warm-up and the end of the load. Measured: +40 MiB over 500
# requests, then a plateau around +60..110 MiB over 4,000 more (glibc arenas of the thread pool that
# encodes PNGs, and torch's CPU allocator). A leaked KV cache or image batch (0.6 MiB of KV per image)
# would exceed it within a few hundred requests.
RSS_SLACK_BYTES = 128 * 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("load"), LOAD_ENV)
    yield srv
    srv.stop()


def loadgen(srv, requests: int) -> dict:
    # --backoff: a refused client waits Retry-After (at most 1 s), so the load stays a mix of 200 and 503.
    return run_loadgen(srv.base, "--requests", str(requests), "--concurrency", str(CONCURRENCY),
                       "--timeout", "120", "--max-time", "900", "--backoff", "1")


def test_every_request_gets_200_or_503_with_retry_after_and_counts_match_metrics(server):
    warm = loadgen(server, WARMUP_REQUESTS)
    assert warm["lost"] == 0 and warm["unexpected_status"] == 0, warm
    rss_warm = rss_bytes(server.process.pid)
    before = metric_series(server)

    summary = loadgen(server, REQUESTS)

    after = metric_series(server)
    rss_after = rss_bytes(server.process.pid)
    print(f"rss after warm-up {rss_warm / 2**20:.1f} MiB, after load {rss_after / 2**20:.1f} MiB")
    ok, refused = summary["status_counts"].get("200", 0), summary["status_counts"].get("503", 0)
    # None lost, none hung, none left unsent, nothing but 200 and 503-with-Retry-After.
    assert summary["sent"] == REQUESTS and summary["lost"] == 0 and summary["refused"] == 0, summary
    assert ok + refused == REQUESTS, summary
    assert summary["missing_retry_after"] == 0, summary
    assert set(summary["error_codes"]) <= {"queue_full"}, summary
    assert ok > 0 and summary["images"] == ok
    assert refused > 0, "the small queue should have refused part of the load"

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert requests_with_status(after, 200) - requests_with_status(before, 200) == ok
    assert requests_with_status(after, 503) - requests_with_status(before, 503) == refused
    assert delta('amskv_requests_rejected_total{reason="queue_full"}') == refused
    images = metric_total(after, "amskv_images_generated_total") - metric_total(before, "amskv_images_generated_total")
    assert images == summary["images"]
    assert delta("amskv_request_images_count") == ok  # every accepted request was queued exactly once
    assert delta("amskv_batch_size_images_sum") == summary["images"]  # each image ran in exactly one batch
    for stage in ("queued", "running"):
        assert delta(f'amskv_requests_cancelled_total{{stage="{stage}"}}') == 0
        assert delta(f'amskv_requests_timed_out_total{{stage="{stage}"}}') == 0
    assert delta('amskv_batch_failures_total{reason="error"}') == 0
    assert_queue_empty(server)
    assert rss_after - rss_warm <= RSS_SLACK_BYTES, (rss_warm, rss_after)
