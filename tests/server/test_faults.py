"""Fault injection against the real server (AMSKV_FAULT_INJECTION=1 exposes POST /_test/faults).

Each fault must leave every accepted request with an answer: a failed batch fails only its own
requests, an OOM is split and retried, a dead worker turns readiness off and refuses work fast.

No test races a clock: a queue that must fill before a batch forms is held (hold_until_queued_images),
and a batch that must still be running is given a long delay (RUNNING_UNTIL_RELEASED) that the test
ends itself by setting batch_delay_ms back to 0.
"""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from tests.server.test_api import Server, concurrently, decode, post  # the same real-server harness

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

FAULT_ENV = {"AMSKV_FAULT_INJECTION": "1", "AMSKV_MAX_BATCH": "4", "AMSKV_MAX_QUEUE_DELAY_MS": "100",
             "AMSKV_MAX_QUEUE_IMAGES": "16", "AMSKV_MAX_IMAGES_PER_REQUEST": "16"}
RUNNING_UNTIL_RELEASED = {"batch_delay_ms": 120_000}  # far beyond any wait below; the test ends it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("faults"), FAULT_ENV)
    yield srv
    srv.stop()


def set_faults(srv: Server, **faults) -> dict:
    return srv.set_faults(**faults)


def test_exception_in_one_batch_fails_only_that_batch(server):
    failures = server.metric('amskv_batch_failures_total{reason="error"}')
    set_faults(server, fail_batches=1)
    failed = post(server.base, {"class_labels": [1]})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    assert "Traceback" not in failed.text
    assert post(server.base, {"class_labels": [1]}).status_code == 200
    assert server.metric('amskv_batch_failures_total{reason="error"}') == failures + 1
    assert httpx.get(f"{server.base}/readyz").status_code == 200


def test_client_disconnect_cancels_queued_work(server):
    set_faults(server, **RUNNING_UNTIL_RELEASED)
    cancelled = server.metric('amskv_requests_cancelled_total{stage="queued"}')
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(post, server.base, {"class_labels": [1], "n": 4})
            server.wait_for(lambda: server.metric("amskv_batch_running_images") > 0, 30, "a running batch")
            with pytest.raises(httpx.ReadTimeout):  # this client gives up while its job is queued
                httpx.post(f"{server.base}/v1/generate", json={"class_labels": [2]}, timeout=0.3)
            server.wait_for(lambda: server.metric('amskv_requests_cancelled_total{stage="queued"}') > cancelled,
                            30, "the cancellation")
            assert server.metric("amskv_queue_requests") == 0
            set_faults(server, batch_delay_ms=0)
            assert busy.result(timeout=60).status_code == 200
    finally:
        set_faults(server, batch_delay_ms=0)


def test_a_client_deadline_answers_504_deadline_exceeded_not_overload(server):
    idle = post(server.base, {"class_labels": [2], "timeout_ms": 1})  # an idle server: the client's own budget
    assert idle.status_code == 504 and idle.json()["error"]["code"] == "deadline_exceeded", idle.text
    assert idle.json()["error"]["param"] == "timeout_ms" and "retry-after" not in idle.headers
    set_faults(server, **RUNNING_UNTIL_RELEASED)
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(post, server.base, {"class_labels": [1], "n": 4})
            server.wait_for(lambda: server.metric("amskv_batch_running_images") > 0, 30, "a running batch")
            late = post(server.base, {"class_labels": [2], "timeout_ms": 200})  # queued behind the busy slots
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded", late.text
            set_faults(server, batch_delay_ms=0)
            assert busy.result(timeout=60).status_code == 200
    finally:
        set_faults(server, batch_delay_ms=0)


def test_concurrent_requests_share_a_batch_and_images_do_not_depend_on_batch_mates(server):
    compared = {"class_labels": [3], "seed": 1234, "cfg_scale": 2.0}
    alone = post(server.base, compared)
    assert alone.status_code == 200, alone.text
    assert alone.json()["usage"]["batch_images"] == 1
    # Held until all four are queued: the compared request then runs in one batch with three requests
    # that use other sampling parameters (the batch cap is 4).
    set_faults(server, hold_until_queued_images=4)
    bodies = [compared] + [{"class_labels": [label], "seed": 99 + label, "top_k": 50, "top_p": 0.8}
                           for label in range(3)]
    responses = concurrently(server.base, bodies)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    busy = responses[0]
    assert busy.json()["usage"]["batch_images"] == 4 and busy.headers["x-batch-images"] == "4", busy.json()["usage"]
    assert np.array_equal(decode(busy.json()["data"][0]["b64_json"]), decode(alone.json()["data"][0]["b64_json"]))


def test_overload_gets_503_with_retry_after_and_accepted_requests_succeed(server):
    rejected = server.metric('amskv_requests_rejected_total{reason="queue_full"}')
    set_faults(server, hold_until_queued_images=17)  # more than the queue holds: released below
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, server.base, {"class_labels": [1], "n": 16})
            server.wait_for(lambda: server.metric("amskv_queue_images") == 16, 30, "a full queue")
            refused = concurrently(server.base, [{"class_labels": [1], "n": 16}] * 5)
            set_faults(server, hold_until_queued_images=0)
            accepted = first.result(timeout=120)
    finally:
        set_faults(server, hold_until_queued_images=0)
    assert accepted.status_code == 200 and len(accepted.json()["data"]) == 16, accepted.text
    for response in refused:
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full", response.text
        assert int(response.headers["retry-after"]) >= 1
    assert server.metric('amskv_requests_rejected_total{reason="queue_full"}') == rejected + 5


def test_injected_oom_is_split_and_retried_with_identical_images(server):
    # Runs after the other module-server tests: the lowered cap stays lowered.
    reference = post(server.base, {"class_labels": [4], "n": 4, "seed": 77}).json()
    ooms = server.metric("amskv_oom_total")
    set_faults(server, oom_calls=2, oom_above_images=1)  # 4 -> OOM; 2 -> OOM; then 1 + 1 + 2
    response = post(server.base, {"class_labels": [4], "n": 4, "seed": 77})
    assert response.status_code == 200, response.text
    assert server.metric("amskv_oom_total") == ooms + 2
    assert server.metric("amskv_batch_max_images") <= 2  # the cap was lowered
    for got, want in zip(response.json()["data"], reference["data"]):
        assert np.array_equal(decode(got["b64_json"]), decode(want["b64_json"]))


def test_dead_worker_turns_readiness_off_and_requests_fail_fast(tmp_path):
    srv = Server(tmp_path, {**FAULT_ENV, "AMSKV_FATAL_EXIT_DELAY_S": "300"})  # inspect it before it exits
    try:
        set_faults(srv, kill_worker=True)
        srv.wait_for(lambda: httpx.get(f"{srv.base}/readyz").status_code == 503, 30, "/readyz 503")
        assert httpx.get(f"{srv.base}/readyz").json()["status"] == "UNHEALTHY"
        began = time.monotonic()
        refused = post(srv.base, {"class_labels": [1]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_dead"
        assert time.monotonic() - began < 10  # answered, not left hanging until the request timeout
        liveness = httpx.get(f"{srv.base}/livez")
        assert liveness.status_code == 503 and "inference worker died" in liveness.json()["detail"]
        assert srv.metric("amskv_ready") == 0
    finally:
        srv.stop()


def test_drain_refuses_new_work_while_queued_work_finishes(tmp_path):
    srv = Server(tmp_path, FAULT_ENV)
    try:
        set_faults(srv, **RUNNING_UNTIL_RELEASED)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, srv.base, {"class_labels": [1], "n": 4})
            srv.wait_for(lambda: srv.metric("amskv_batch_running_images") == 4, 30, "a running batch")
            second = pool.submit(post, srv.base, {"class_labels": [2]})
            srv.wait_for(lambda: srv.metric("amskv_queue_requests") == 1, 30, "a queued request")
            srv.process.send_signal(signal.SIGTERM)
            srv.wait_for(lambda: httpx.get(f"{srv.base}/readyz").status_code == 503, 30, "/readyz 503")
            assert httpx.get(f"{srv.base}/readyz").json()["status"] == "DRAINING"
            refused = post(srv.base, {"class_labels": [3]})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert "retry-after" in refused.headers
            set_faults(srv, batch_delay_ms=0)  # the running batch ends; the queued request runs next
            assert first.result(timeout=60).status_code == 200
            assert second.result(timeout=60).status_code == 200
        assert srv.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        srv.stop()


def test_drain_timeout_still_answers_leftover_work(tmp_path):
    srv = Server(tmp_path, {**FAULT_ENV, "AMSKV_DRAIN_TIMEOUT_S": "1", "AMSKV_MAX_BATCH": "1"})
    try:
        set_faults(srv, **RUNNING_UNTIL_RELEASED)  # still running when the drain times out; stopping ends it
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(post, srv.base, {"class_labels": [k]}) for k in range(2)]
            srv.wait_for(lambda: srv.metric("amskv_batch_running_images") == 1
                         and srv.metric("amskv_queue_requests") == 1, 30, "one running, one queued")
            srv.process.send_signal(signal.SIGTERM)
            statuses = [f.result(timeout=60).status_code for f in futures]
        assert statuses == [503, 503]
        assert srv.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        srv.stop()
