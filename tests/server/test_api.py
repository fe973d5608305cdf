"""The real server: `python -m server.cli` (uvicorn) on a loopback port with the bundled default model."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from amskv.config import VAR_PRESETS
from server import metrics
from amskv.naming import image_file_name
from server.classes import ClassCatalog, resolve_labels
from server.errors import InvalidRequest
from server.metrics import GENERATE_ENDPOINTS

REPO = Path(__file__).resolve().parents[2]
READY_WAIT_S = 180
# Small limits so batching, splitting and overload show up with a handful of requests.
SERVER_ENV = {"AMSKV_MAX_BATCH": "4", "AMSKV_MAX_QUEUE_IMAGES": "16", "AMSKV_MAX_IMAGES_PER_REQUEST": "16",
              "AMSKV_MAX_QUEUE_DELAY_MS": "200"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """Ctrl-C a server (its drain runs), and kill it if it has not ended within ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class ServerProcess:
    """`python -m server.cli` on a free loopback port, its log in tmp_path; does not wait for readiness."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"server-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AMSKV_")}
        full_env.update({"AMSKV_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", **env})
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])

    def wait_for(self, check, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited ({self.process.returncode}) waiting for {what}:\n{self.log_tail()}")
            try:
                result = check()
            except httpx.HTTPError:
                result = None
            if result:
                return result
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}:\n{self.log_tail()}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        return sum(values)

    def set_faults(self, **faults) -> dict:
        """Test-only faults (the server needs AMSKV_FAULT_INJECTION=1); see server.worker.FaultPlan."""
        response = httpx.post(f"{self.base}/_test/faults", json=faults, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        stop_process(self.process, 30)


class Server(ServerProcess):
    """The server process, ready: its constructor waits for /readyz 200."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        super().__init__(tmp_path, env)
        self.wait_for(lambda: httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200, READY_WAIT_S,
                      "/readyz 200")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("api"), SERVER_ENV)
    srv.metrics_at_start = httpx.get(f"{srv.base}/metrics", timeout=10).text  # before any request
    yield srv
    srv.stop()


def post(base: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/v1/generate", json=body, timeout=120, **kwargs)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def concurrently(base: str, bodies: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: post(base, body), bodies))


def test_health_model_card_classes_and_docs(server):
    assert httpx.get(f"{server.base}/livez").status_code == 200
    assert httpx.get(f"{server.base}/readyz").json()["status"] == "READY"
    card = httpx.get(f"{server.base}/v1/models").json()["data"][0]
    assert card["kv_bytes_per_image"] > 0 and 1 <= card["max_batch"] <= 4
    classes = httpx.get(f"{server.base}/v1/classes").json()["data"]
    assert len(classes) == card["num_classes"]
    if card["num_classes"] == 10:
        assert classes[3]["names"][0] == "three"
    assert "/v1/generate" in httpx.get(f"{server.base}/openapi.json").json()["paths"]
    assert httpx.get(f"{server.base}/docs").status_code == 200
    assert httpx.post(f"{server.base}/_test/faults", json={"kill_worker": True}).status_code == 404


def test_enum_labelled_counters_are_exported_at_zero_by_a_fresh_server(server):
    # Read from the fresh server before any request: alert rules built on increase() need every
    # series present at 0, not appearing at its first event.
    samples = {}
    for line in server.metrics_at_start.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    expected = [f'amskv_requests_rejected_total{{reason="{r}"}}' for r in metrics.REJECT_REASONS]
    expected += [f'amskv_requests_cancelled_total{{stage="{s}"}}' for s in metrics.CANCEL_STAGES]
    expected += [f'amskv_requests_timed_out_total{{stage="{s}"}}' for s in metrics.TIMEOUT_STAGES]
    expected += [f'amskv_batch_failures_total{{reason="{r}"}}' for r in metrics.FAILURE_REASONS]
    expected += ["amskv_oom_total", "amskv_batch_splits_total"]
    assert {key: samples.get(key) for key in expected} == dict.fromkeys(expected, 0.0)


def test_docs_page_loads_its_assets_from_the_server_itself(server):
    page = httpx.get(f"{server.base}/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert len(urls) >= 4, urls  # stylesheet, icon, script, the OpenAPI document
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"/docs loads {url} from another host"
        assert httpx.get(f"{server.base}{url}").status_code == 200, url
    assert re.search(r"https?://", page.text) is None  # nothing is fetched from elsewhere (no CDN, no validator)
    assert httpx.get(f"{server.base}/redoc").status_code == 404  # its page would load a CDN script


def test_fresh_server_exports_the_model_and_endpoint_series_at_zero(server):
    model = httpx.get(f"{server.base}/v1/models").json()["data"][0]["id"]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(server.metrics_at_start) for s in family.samples}
    # the model's name is known once the engine loaded, before the first request
    assert samples[("amskv_images_generated_total", (("model", model),))] == 0
    assert samples[("amskv_kv_cache_bytes_per_image", (("model", model),))] > 0
    assert samples[("amskv_kv_cache_vanilla_bytes_per_image", (("model", model),))] > 0
    for endpoint in GENERATE_ENDPOINTS:
        assert samples[("amskv_request_duration_seconds_count", (("endpoint", endpoint),))] == 0
    # one time-per-scale series for each of the model's scales, known once it loaded
    scales = sorted(int(dict(labels)["scale"]) for name, labels in samples
                    if name == "amskv_scale_duration_seconds_count")
    assert scales == list(range(len(VAR_PRESETS["demo"].var.patch_nums)))  # the server runs the bundled demo
    assert all(samples[("amskv_scale_duration_seconds_count", (("scale", str(i)),))] == 0 for i in scales)


def test_every_batch_records_the_time_of_each_scale(server):
    def counts() -> dict[str, float]:
        text = httpx.get(f"{server.base}/metrics", timeout=10).text
        return {s.labels["scale"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "amskv_scale_duration_seconds_count"}

    before = counts()
    response = post(server.base, {"class_labels": [3], "seed": 11})
    assert response.status_code == 200, response.text
    after = counts()
    assert set(after) == set(before) and len(after) > 1
    assert all(after[scale] - before[scale] >= 1 for scale in after)  # the batch's every scale observed once


def test_images_decode_at_the_model_resolution_in_every_format(server):
    card = httpx.get(f"{server.base}/v1/models").json()["data"][0]
    side, mode = card["resolution"], "L" if card["channels"] == 1 else "RGB"

    response = post(server.base, {"class_labels": [1, 2], "n": 2, "seed": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == card["id"] and body["id"] == response.headers["x-request-id"]
    assert [(d["index"], d["class_label"], d["seed"]) for d in body["data"]] == \
        [(0, 1, 7), (1, 1, 8), (2, 2, 9), (3, 2, 10)]
    for item in body["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        assert image.format == "PNG" and image.size == (side, side) and image.mode == mode
    assert body["usage"]["images"] == 4 and body["usage"]["inference_time_s"] > 0

    png = post(server.base, {"class_labels": [1], "seed": 7, "response_format": "png"})
    assert png.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), decode(body["data"][0]["b64_json"]))

    archive = zipfile.ZipFile(io.BytesIO(post(server.base, {"class_labels": [2], "n": 2, "seed": 9,
                                                               "response_format": "zip"}).content))
    manifest = json.loads(archive.read("manifest.json"))
    files = [item["file"] for item in manifest["data"]]
    assert files == ["000_c2_s9.png", "001_c2_s10.png"] == [image_file_name(i, 2, 9 + i) for i in range(2)]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(archive.read(files[0])))),
                          decode(body["data"][2]["b64_json"]))


def test_large_request_is_split_across_batches(server):
    response = post(server.base, {"class_labels": ["seven"], "n": 10, "seed": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["seed"] for d in body["data"]] == list(range(5, 15))
    assert body["usage"]["batches"] == 3 and body["usage"]["batch_images"] == 4


def test_each_generate_request_logs_one_access_line_and_the_setting_quiets_it(server, tmp_path):
    response = post(server.base, {"class_labels": [3], "n": 2, "seed": 4})
    request_id = response.headers["x-request-id"]
    line = server.wait_for(lambda: next((l for l in server.log.read_text().splitlines()
                                         if "amskv.access" in l and f"id={request_id}" in l), None), 10,
                           "the access line")
    fields = dict(item.split("=", 1) for item in line.split("amskv.access: ", 1)[1].split())
    assert (fields["route"], fields["status"], fields["images"]) == ("/v1/generate", "200", "2")
    assert float(fields["inference_s"]) > 0 and float(fields["total_s"]) >= float(fields["queue_s"]) >= 0
    quiet = Server(tmp_path, {**SERVER_ENV, "AMSKV_ACCESS_LOG": "false"})
    try:
        assert post(quiet.base, {"class_labels": [3]}).status_code == 200
        assert "amskv.access" not in quiet.log.read_text()
    finally:
        quiet.stop()


@pytest.mark.parametrize(("body", "param"), [
    ({"class_labels": [1], "cfg_scale": 25}, "cfg_scale"),
    ({"class_labels": [1], "cfg_scale": -1}, "cfg_scale"),
    ({"class_labels": [1], "seed": 2**32}, "seed"),
    ({"class_labels": [1], "seed": -1}, "seed"),
    ({"class_labels": [1], "top_p": 1.5}, "top_p"),
    ({"class_labels": [1], "n": 0}, "n"),
    ({"class_labels": [1, "no-such-class"]}, "class_labels[1]"),
    ({"class_labels": [1, 12345]}, "class_labels[1]"),
    ({"class_labels": []}, "class_labels"),
    ({"class_labels": [1], "colour": "red"}, "colour"),
    ({"class_labels": [1], "n": 17}, "n"),  # more than AMSKV_MAX_IMAGES_PER_REQUEST
    ({"class_labels": [1, 2], "response_format": "png"}, "response_format"),
    ({"class_labels": [1], "top_k": 10**9}, "top_k"),
])
def test_bad_fields_get_422_naming_the_field(server, body, param):
    response = post(server.base, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"] or "class" in error["message"]


def test_nan_empty_body_wrong_type_and_oversized_body(server):
    url = f"{server.base}/generate"
    nan = httpx.post(url, content=b'{"class_labels": [1], "cfg_scale": NaN}',
                     headers={"content-type": "application/json"})
    assert nan.status_code == 422 and nan.json()["error"]["param"] == "cfg_scale"
    empty = httpx.post(url)
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "body"
    rejected = 'amskv_requests_rejected_total{reason="%s"}'
    before = {reason: server.metric(rejected % reason) for reason in ("unsupported_media_type", "body_too_large")}
    wrong = httpx.post(url, content=b"class_labels=1", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415 and wrong.json()["error"]["code"] == "unsupported_media_type"
    huge = httpx.post(url, json={"class_labels": [1] * 40000})
    assert huge.status_code == 413 and "65536" in huge.json()["error"]["message"]
    chunked = httpx.post(url, content=iter([b'{"class_labels": [', b"1, " * 30000, b"1]}"]),
                         headers={"content-type": "application/json"})  # no Content-Length: counted while read
    assert chunked.status_code == 413
    assert server.metric(rejected % "unsupported_media_type") == before["unsupported_media_type"] + 1
    assert server.metric(rejected % "body_too_large") == before["body_too_large"] + 2


# Batch sharing, overload and the drain tests that need a held queue or a running batch live in
# test_faults.py: they order events with the test-only fault plan instead of racing the queue delay.


def test_sigterm_finishes_queued_work_and_exits_cleanly(tmp_path):
    srv = Server(tmp_path, {**SERVER_ENV, "AMSKV_MAX_QUEUE_DELAY_MS": "3000", "AMSKV_FAULT_INJECTION": "1"})
    try:
        srv.set_faults(hold_until_queued_images=4)  # the three requests below stay queued until released
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, srv.base, {"class_labels": [label], "seed": 1}) for label in range(3)]
            srv.wait_for(lambda: srv.metric("amskv_queue_requests") == 3, 30, "three queued requests")
            srv.process.send_signal(signal.SIGTERM)
            srv.wait_for(lambda: httpx.get(f"{srv.base}/readyz").json()["status"] == "DRAINING", 30, "draining")
            srv.set_faults(hold_until_queued_images=0)  # draining runs them at once, not after the 3 s delay
            responses = [f.result(timeout=60) for f in futures]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert [r.json()["usage"]["batch_images"] for r in responses] == [3, 3, 3]
        assert srv.process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        srv.stop()


def test_bad_class_label_is_a_422_naming_its_position():
    catalog = ClassCatalog.imagenet()
    assert resolve_labels(catalog, [207, "n01440764", "Golden Retriever", "980"]) == [207, 0, 207, 980]
    with pytest.raises(InvalidRequest) as ambiguous:  # "crane" is a bird (134) and a machine (517)
        resolve_labels(catalog, [1, "crane"])
    assert ambiguous.value.param == "class_labels[1]" and "n02012849" in ambiguous.value.message
    with pytest.raises(InvalidRequest) as unknown:
        resolve_labels(catalog, ["n99999999"])
    assert unknown.value.param == "class_labels[0]" and unknown.value.code == "unknown_class_label"
    assert "/v1/classes" in unknown.value.message
