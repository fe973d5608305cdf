"""End to end: a real Prometheus scrapes the real service and sees the images it generated.

Starts `python -m amskv_tools.cli serve` (bundled default model, one torch thread) and the `prometheus`
binary on free loopback ports, sends a few /generate requests, then polls Prometheus' HTTP API until
amskv_images_generated_total has risen. Both processes are stopped by PID at the end.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.tools import find_tool

pytestmark = pytest.mark.slow  # starts a real server process (about 5 s each on two cores); tests/README.md

REPO = Path(__file__).resolve().parents[2]
SERVICE_READY_WAIT_S = 240  # model load + warm-up on a 2-core CPU machine
PROMETHEUS_WAIT_S = 60  # first sample needs ~6 s: target discovery is batched every 5 s
REQUESTS = 3
LABELS_PER_REQUEST = [1, 2]




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen, log: Path, interval_s: float = 0.5):
    """Poll ``check()`` until it returns a truthy value; fail early if ``process`` dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"process exited ({process.returncode}) while waiting for {what}:\n{log_tail(log)}")
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{log_tail(log)}")


@pytest.fixture
def service(tmp_path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "service.log"
    env = {**os.environ, "AMSKV_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for name in ("AMSKV_VAR_CHECKPOINT", "AMSKV_VAE_CHECKPOINT", "AMSKV_DEVICE"):
        env.pop(name, None)  # the bundled default model on CPU
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "amskv_tools.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200,
                   SERVICE_READY_WAIT_S, "the service's /readyz", process, log)
        yield base
    finally:
        stop(process)


@pytest.fixture
def prometheus(tmp_path, service) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    binary = find_tool("prometheus")
    port = free_port()
    target = service.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        f"scrape_configs:\n  - job_name: amskv\n    static_configs:\n      - targets: ['{target}']\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=5).status_code == 200,
                   PROMETHEUS_WAIT_S, "Prometheus /-/ready", process, log)
        yield base, process, log
    finally:
        stop(process)


def query(base: str, promql: str) -> float | None:
    """The single value of an instant query, or None while Prometheus has no such series."""
    body = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    results = body["data"]["result"]
    return float(results[0]["value"][1]) if results else None


def test_prometheus_sees_generated_images(service, prometheus):
    prom_base, prom_process, prom_log = prometheus
    # The target is being scraped and reports ready before any work is sent.
    wait_until(lambda: query(prom_base, 'up{job="amskv"}') == 1 and query(prom_base, "amskv_ready") == 1,
               PROMETHEUS_WAIT_S, "a first successful scrape", prom_process, prom_log)
    before = query(prom_base, "sum(amskv_images_generated_total)") or 0.0

    with httpx.Client(base_url=service, timeout=120) as client:
        for _ in range(REQUESTS):
            response = client.post("/generate", json={"class_labels": LABELS_PER_REQUEST})
            assert response.status_code == 200, response.text

    expected = before + REQUESTS * len(LABELS_PER_REQUEST)
    risen = wait_until(
        lambda: (query(prom_base, "sum(amskv_images_generated_total)") or 0.0) >= expected,
        PROMETHEUS_WAIT_S, f"amskv_images_generated_total >= {expected}", prom_process, prom_log,
    )
    assert risen
    assert query(prom_base, "sum(amskv_images_generated_total)") == expected  # nothing else talks to it
