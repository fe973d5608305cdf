"""Continuous batching against live servers (mnist64, one torch thread): requests join and leave at scale
boundaries (docs/api.md, "Lifecycle").

Times are measured with the client's own clock around real HTTP exchanges; the assertions compare the order
of events (a preview before a completion) or use generous bounds (3x an idle latency + 1 s), so they hold on a
loaded machine. Images are compared byte for byte: the product promises them bit-identical in any mix.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.test_api import Server, post  # the same real-server harness

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

ENV = {"AMSKV_MODEL": "mnist64", "AMSKV_MAX_QUEUE_DELAY_MS": "0"}
SMALL = {"class_labels": [5], "seed": 99, "cfg_scale": 3.0}


@pytest.fixture(scope="module")
def continuous(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("continuous"), ENV)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("static"), {**ENV, "AMSKV_SCHEDULER": "static"})
    yield srv
    srv.stop()


def streamed(base: str, body: dict, began: float) -> tuple[float | None, str | None]:
    """(seconds from ``began`` to the first preview event, the image's b64 PNG) of a streamed request."""
    first, image = None, None
    with httpx.stream("POST", f"{base}/v1/generate", json={**body, "stream": True}, timeout=300) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "preview" and first is None:
                first = time.monotonic() - began
            elif line.startswith("data: ") and event == "image":
                image = json.loads(line[len("data: "):])["b64_json"]
    return first, image


def joined_beside_a_large_request(srv: Server) -> tuple[float, float, str]:
    """(the 32-image request's completion, the 1-image stream's first preview, its image), both in seconds
    from the 32-image request's start; the stream is sent 1 s in."""
    with ThreadPoolExecutor(1) as pool:
        began = time.monotonic()
        large = pool.submit(lambda: (post(srv.base, {"class_labels": [1, 2, 3, 4], "n": 8, "seed": 7}),
                                     time.monotonic() - began))
        time.sleep(1.0)
        first_preview, image = streamed(srv.base, SMALL, began)
        response, large_done = large.result(timeout=300)
    assert response.status_code == 200 and len(response.json()["data"]) == 32
    return large_done, first_preview, image


def test_a_stream_sent_into_a_running_batch_previews_before_the_batch_ends(continuous):
    _, idle_image = streamed(continuous.base, SMALL, time.monotonic())
    large_done, first_preview, image = joined_beside_a_large_request(continuous)
    assert first_preview < large_done, f"first preview at {first_preview:.2f} s, 32 images done at {large_done:.2f} s"
    assert image == idle_image  # byte-equal to the same request on an idle server


def test_static_scheduling_previews_only_after_the_batch_ends(static):
    _, idle_image = streamed(static.base, SMALL, time.monotonic())
    large_done, first_preview, image = joined_beside_a_large_request(static)
    assert first_preview > large_done, f"first preview at {first_preview:.2f} s, 32 images done at {large_done:.2f} s"
    assert image == idle_image


def test_an_abandoned_stream_frees_the_server_at_the_next_boundary(continuous):
    began = time.monotonic()
    assert post(continuous.base, SMALL).status_code == 200
    idle = time.monotonic() - began
    cancelled = continuous.metric("amskv_images_cancelled_total")
    with httpx.stream("POST", f"{continuous.base}/v1/generate", timeout=300,
                      json={"class_labels": [1, 2, 3, 4, 5, 6, 7, 8], "n": 8, "seed": 3, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("event: preview"):
                break  # closed after its first preview
    began = time.monotonic()
    assert post(continuous.base, SMALL).status_code == 200
    delayed = time.monotonic() - began
    assert delayed <= 3 * idle + 1.0, f"1 image took {delayed:.2f} s after an abandoned stream (idle {idle:.2f} s)"
    continuous.wait_for(lambda: continuous.metric("amskv_images_cancelled_total") > cancelled, 30,
                        "the abandoned images to be counted as cancelled")
    continuous.wait_for(lambda: continuous.metric("amskv_batch_running_images") == 0, 30, "no running image")
