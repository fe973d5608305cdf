"""The real server: `python -m server.cli` (uvicorn) on a loopback port with the bundled default model.

Its harness (Server, ServerProcess, post) serves every test that needs a real process; the tests here are what
only a process shows: a fresh metrics registry, its log, and SIGTERM. The HTTP contract (status codes, error
bodies, image formats) is checked in process, in test_contract.py.
"""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from amskv.config import VAR_PRESETS
from server import metrics
from server.metrics import GENERATE_ENDPOINTS

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

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
