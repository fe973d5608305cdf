"""Process lifecycle against the real server: the port opens before the model loads, and fatal states end
the process with a non-zero status so a restart policy or a liveness probe replaces it.

Nothing races a clock: a slow start-up is the test-only AMSKV_FAULT_LOAD_DELAY_S (far longer than the test
needs, ended by stopping the server), and every exit is awaited with a generous bound.
"""
from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from tests.server.test_api import Server, ServerProcess, post

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

EXIT_WAIT_S = 120  # bounds a hang only; the process exits within seconds
FATAL_EXIT = 70
STARTUP_FAILED_EXIT = 3
FAULT_ENV = {"AMSKV_FAULT_INJECTION": "1", "AMSKV_MAX_BATCH": "4", "AMSKV_MAX_QUEUE_DELAY_MS": "0"}


class StartingServer(ServerProcess):
    """The server process without waiting for readiness (the Server harness waits for /readyz 200)."""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> httpx.Response | None:
        """The response, or None while the port is not open yet; fails if the process has exited."""
        if self.process.poll() is not None:
            pytest.fail(f"server exited ({self.process.returncode}):\n{self.text()[-3000:]}")
        try:
            return httpx.get(f"{self.base}{path}", timeout=10)
        except httpx.TransportError:
            return None

    def wait_exit(self) -> int:
        try:
            return self.process.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"server still running after {EXIT_WAIT_S} s:\n{self.text()[-3000:]}")


def test_livez_and_metrics_answer_while_the_model_loads(tmp_path):
    srv = StartingServer(tmp_path, {**FAULT_ENV, "AMSKV_FAULT_LOAD_DELAY_S": "600"})
    try:
        deadline = time.monotonic() + EXIT_WAIT_S
        while (live := srv.get("/livez")) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live is not None and live.status_code == 200, "the port did not open during the load"
        ready = srv.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "STARTING"
        scraped = srv.get("/metrics")
        assert scraped.status_code == 200 and "amskv_ready 0.0" in scraped.text
        assert "amskv_batch_max_configured_images 4.0" in scraped.text
        refused = post(srv.base, {"class_labels": [1]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert srv.get("/v1/models").status_code == 503
    finally:
        srv.stop()
    assert srv.process.returncode is not None


def test_a_load_past_its_timeout_ends_start_up_with_status_3(tmp_path):
    srv = StartingServer(tmp_path, {**FAULT_ENV, "AMSKV_FAULT_LOAD_DELAY_S": "600", "AMSKV_LOAD_TIMEOUT_S": "1"})
    assert srv.wait_exit() == STARTUP_FAILED_EXIT
    assert "start-up failed" in srv.text() and "AMSKV_LOAD_TIMEOUT_S=1" in srv.text()


def test_a_killed_worker_ends_the_process_with_a_failure_status(tmp_path):
    srv = Server(tmp_path, FAULT_ENV)
    try:
        srv.set_faults(kill_worker=True)
        assert srv.process.wait(timeout=EXIT_WAIT_S) == FATAL_EXIT
        assert "fatal: the inference worker died" in srv.log.read_text(errors="replace")
    finally:
        srv.stop()


def test_k_failed_batches_in_a_row_end_the_process(tmp_path):
    srv = Server(tmp_path, {**FAULT_ENV, "AMSKV_MAX_CONSECUTIVE_FAILURES": "2",
                            "AMSKV_FATAL_EXIT_DELAY_S": "300"})
    try:
        srv.set_faults(fail_batches=1)
        assert post(srv.base, {"class_labels": [1]}).status_code == 500
        assert post(srv.base, {"class_labels": [1]}).status_code == 200  # a success resets the count
        assert httpx.get(f"{srv.base}/livez").status_code == 200
        assert srv.metric("amskv_last_batch_completed_timestamp_seconds") > 0  # the heartbeat
        srv.set_faults(fail_batches=2)
        assert post(srv.base, {"class_labels": [1]}).status_code == 500
        assert post(srv.base, {"class_labels": [1]}).status_code == 500
        srv.wait_for(lambda: httpx.get(f"{srv.base}/livez").status_code == 503, 60, "/livez 503")
        assert "2 batches failed in a row" in httpx.get(f"{srv.base}/livez").json()["detail"]
        refused = post(srv.base, {"class_labels": [1]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_dead"
    finally:
        srv.stop()
