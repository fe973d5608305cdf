"""Shared harness for the reliability suite: the real server (`python -m server.cli` on 127.0.0.1 with
the bundled default model), metric snapshots, RSS readings and the load generator as a subprocess.

Sizes come from environment variables so the same tests make the fast CI part (defaults) and the
longer documented part (docs/reliability.md): RELIABILITY_LOAD_REQUESTS, RELIABILITY_FUZZ_EXAMPLES.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from tests.server.test_api import Server  # the same real-server harness as the API tests

REPO = Path(__file__).resolve().parents[2]
LOADGEN = REPO / "scripts" / "loadgen.py"

# Small limits, so overload, splitting and leaks show up within seconds on two shared cores.
SMALL_LIMITS = {"AMSKV_MAX_BATCH": "4", "AMSKV_MAX_QUEUE_IMAGES": "16", "AMSKV_MAX_IMAGES_PER_REQUEST": "16",
                "AMSKV_MAX_QUEUE_DELAY_MS": "20"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def start_server(tmp_path: Path, env: dict[str, str]) -> Server:
    """A real server with the default model (the harness drops any AMSKV_* from the outer environment)."""
    return Server(tmp_path, env)


def metric_series(srv: Server) -> dict[str, float]:
    """Every sample of /metrics, keyed by its series text, e.g. 'amskv_requests_total{...,status="200"}'."""
    text = httpx.get(f"{srv.base}/metrics", timeout=10).text
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            series[key] = float(value)
    return series


def metric_total(series: dict[str, float], name: str) -> float:
    """A metric summed over all its label values."""
    return sum(value for key, value in series.items() if key == name or key.startswith(name + "{"))


def requests_with_status(series: dict[str, float], status: int) -> float:
    """Generate requests that ended with `status`, over both paths (/v1/generate and /generate)."""
    return sum(value for key, value in series.items()
               if key.startswith("amskv_requests_total{") and f'status="{status}"' in key)


def assert_queue_empty(srv: Server) -> None:
    """No slot leaked: nothing queued, nothing running."""
    series = metric_series(srv)
    assert series["amskv_queue_requests"] == 0, series["amskv_queue_requests"]
    assert series["amskv_queue_images"] == 0, series["amskv_queue_images"]
    assert series["amskv_batch_running_images"] == 0, series["amskv_batch_running_images"]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def start_loadgen(base: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(LOADGEN), "--url", base, *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_loadgen(process: subprocess.Popen, timeout_s: float) -> dict:
    stdout, stderr = process.communicate(timeout=timeout_s)
    assert stdout.strip(), f"loadgen printed nothing (exit {process.returncode}):\n{stderr}"
    summary = json.loads(stdout)
    print("loadgen:", json.dumps(summary))  # the figures show up with `pytest -s` or in the failure report
    return summary


def run_loadgen(base: str, *args: str, timeout_s: float = 900) -> dict:
    return finish_loadgen(start_loadgen(base, *args), timeout_s)


@pytest.fixture(scope="session")
def small_server(tmp_path_factory):
    """One server with small limits for the fuzz test (schemathesis reads its /openapi.json over HTTP)."""
    srv = start_server(tmp_path_factory.mktemp("reliability"), {**SMALL_LIMITS, "AMSKV_MAX_IMAGES_PER_REQUEST": "4"})
    yield srv
    srv.stop()
