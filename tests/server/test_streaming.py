"""Streaming against the real server: POST /v1/generate with stream: true (SSE), and GET /v1/status.

A streamed image is the plain request's image, byte for byte (images are batch-invariant, so the
streamed and the plain request may share a batch or not).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.test_api import SERVER_ENV, Server, decode, post  # the same real-server harness

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

STREAM_ENV = {**SERVER_ENV, "AMSKV_FAULT_INJECTION": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("stream"), STREAM_ENV)
    yield srv
    srv.stop()


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """Parse a text/event-stream body into (event, data) pairs, in order."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def stream(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/generate", json={**body, "stream": True}, timeout=120)


def test_one_streamed_image_gets_a_preview_per_scale_then_the_plain_requests_png_then_done(server):
    response = stream(server.base, {"class_labels": ["seven"], "seed": 11})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = read_events(response)
    kinds = [kind for kind, _ in events]
    previews = [data for kind, data in events if kind == "preview"]
    scales = previews[0]["of"]
    assert scales >= 2
    assert kinds == ["preview"] * scales + ["image", "done"]
    assert [p["scale"] for p in previews] == list(range(scales))
    assert {p["index"] for p in previews} == {0}
    for p in previews:
        assert decode(p["b64_json"]).shape[:2] == (32, 32)  # previews are at the model's resolution
    image = events[-2][1]
    plain = post(server.base, {"class_labels": ["seven"], "seed": 11}).json()["data"][0]
    assert image["b64_json"] == plain["b64_json"]  # the same PNG bytes
    assert (image["class_label"], image["seed"]) == (7, 11)
    usage = events[-1][1]["usage"]
    assert usage["images"] == 1 and usage["batch_images"] >= 1


def test_streamed_and_plain_requests_share_a_batch_and_only_streamed_rows_preview(server):
    server.set_faults(hold_until_queued_images=3)  # both requests queue before the batch forms
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream, server.base, {"class_labels": [1, 2], "seed": 40})
        plain = pool.submit(post, server.base, {"class_labels": [3], "seed": 50})
        streamed, plain = streamed.result(), plain.result()
    assert plain.status_code == 200 and plain.json()["usage"]["batch_images"] == 3
    events = read_events(streamed)
    done = events[-1]
    assert done[0] == "done" and done[1]["usage"]["batch_images"] == 3  # one batch of 3 rows
    previews = [data for kind, data in events if kind == "preview"]
    scales = previews[0]["of"]
    assert len(previews) == 2 * scales  # previews for the streamed rows only
    for index in (0, 1):
        assert [p["scale"] for p in previews if p["index"] == index] == list(range(scales))
    images = [data for kind, data in events if kind == "image"]
    alone = post(server.base, {"class_labels": [1, 2], "seed": 40}).json()["data"]
    assert [i["b64_json"] for i in images] == [i["b64_json"] for i in alone]


def counted(server, status: int) -> float:
    return server.metric(f'amskv_requests_total{{endpoint="/v1/generate",status="{status}"}}')


def test_an_error_mid_stream_is_an_error_event_with_the_usual_envelope(server):
    ok, failed = counted(server, 200), counted(server, 500)
    server.set_faults(fail_batches=1)
    response = stream(server.base, {"class_labels": [4]})
    assert response.status_code == 200  # the stream had started
    events = read_events(response)
    assert events[-1][0] == "error"
    assert events[-1][1] == {"error": {"message": "image generation failed; the server log has details",
                                       "type": "server_error", "code": "generation_failed", "param": None}}
    assert "image" not in [kind for kind, _ in events]
    # counted by how it ended, not by the 200 the stream started with
    server.wait_for(lambda: counted(server, 500) == failed + 1, 10, "the failed stream counted as 500")
    assert counted(server, 200) == ok


def test_a_client_that_leaves_mid_stream_cancels_its_images(server):
    server.set_faults(batch_delay_ms=120_000)  # the batch sleeps until the test ends the delay
    cancelled = server.metric('amskv_requests_cancelled_total')
    ok, left = counted(server, 200), counted(server, 499)
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{server.base}/v1/generate",
                               json={"class_labels": [5], "stream": True}) as response:
                assert response.status_code == 200
                server.wait_for(lambda: server.metric("amskv_batch_running_images") > 0, 30, "a running batch")
        server.wait_for(lambda: server.metric("amskv_requests_cancelled_total") > cancelled, 30, "the cancellation")
        server.wait_for(lambda: counted(server, 499) == left + 1, 30, "the abandoned stream counted as 499")
        assert counted(server, 200) == ok
    finally:
        server.set_faults(batch_delay_ms=0)
    server.wait_for(lambda: httpx.get(f"{server.base}/v1/status").json()["running_images"] == 0, 30, "an idle worker")


def test_status_reports_the_queue_and_the_running_batch(server):
    server.set_faults(batch_delay_ms=120_000)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, server.base, {"class_labels": [1], "n": 4})
            server.wait_for(lambda: httpx.get(f"{server.base}/v1/status").json()["running_images"] == 4, 30,
                            "a batch of 4 running")
            queued = pool.submit(post, server.base, {"class_labels": [2], "n": 2})
            status = server.wait_for(
                lambda: (s := httpx.get(f"{server.base}/v1/status").json())["queued_images"] == 2 and s, 30,
                "2 images queued")
            assert status["status"] == "READY" and status["queued_requests"] == 1 and status["running_requests"] == 1
            server.set_faults(batch_delay_ms=0)
            assert running.result().status_code == 200 and queued.result().status_code == 200
    finally:
        server.set_faults(batch_delay_ms=0)
    idle = httpx.get(f"{server.base}/v1/status").json()
    assert idle["queued_images"] == 0 and idle["running_images"] == 0 and idle["max_batch"] == 4
