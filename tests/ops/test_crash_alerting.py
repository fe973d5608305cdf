"""The crash path reaches alerting: a real Prometheus, with the compose stack's scrape interval and alert rules,
scrapes a real replica that fails its batches until it exits with status 70.

Found: the fatal-exit delay (2 s) was shorter than the scrape interval (5 s), so the failure counters died with
the process and one crash paged nobody. The compose replicas now stay up AMSKV_FATAL_EXIT_DELAY_S=15 s (three
scrapes) in their fatal state, which AmskvFatalState reads, and AmskvBatchErrors sees the failures.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.server.test_api import ServerProcess, free_port, post
from tests.server.test_prometheus_scrape import query, stop
from tests.tools import find_tool

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

REPO = Path(__file__).resolve().parents[2]
COMPOSE_PROMETHEUS = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
RULES = REPO / "docker/prometheus/rules/amskv-alerts.yml"
COMPOSE_API_ENV = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-api"]["environment"]
REPLICA_ENV = {"AMSKV_FAULT_INJECTION": "1", "AMSKV_MAX_BATCH": "4", "AMSKV_MAX_CONSECUTIVE_FAILURES": "3",
               "AMSKV_FATAL_EXIT_DELAY_S": COMPOSE_API_ENV["AMSKV_FATAL_EXIT_DELAY_S"]}
START_S, ALERT_S = 240, 90


def firing(base: str, alert: str) -> bool:
    return query(base, f'ALERTS{{alertname="{alert}",alertstate="firing"}}') == 1


def wait(check, timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tails = "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                      for log in logs)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


def test_one_crash_pages_and_its_last_counters_are_scraped(tmp_path):
    replica = ServerProcess(tmp_path, REPLICA_ENV)
    prometheus_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {key: COMPOSE_PROMETHEUS["global"][key]
                   for key in ("scrape_interval", "scrape_timeout", "evaluation_interval")},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "amskv", "static_configs": [{"targets": [f"127.0.0.1:{replica.port}"]}]}],
    }))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        prometheus = subprocess.Popen([find_tool("prometheus"), f"--config.file={config}",
                                       f"--web.listen-address=127.0.0.1:{prometheus_port}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                                      cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{prometheus_port}"
    logs = [replica.log, log]
    try:
        wait(lambda: httpx.get(f"{replica.base}/readyz", timeout=5).status_code == 200, START_S, "the replica", logs)
        wait(lambda: query(base, "amskv_ready") == 1, ALERT_S, "a scrape of the ready replica", logs)
        replica.set_faults(fail_batches=1000)  # every step fails: 3 in a row end the process
        failed = 0
        while httpx.get(f"{replica.base}/livez", timeout=5).status_code == 200 and failed < 20:
            assert post(replica.base, {"class_labels": [1]}).status_code == 500
            failed += 1
        fatal_at = time.monotonic()
        status = replica.process.wait(timeout=60)
        lived_s = time.monotonic() - fatal_at
        wait(lambda: firing(base, "AmskvFatalState"), ALERT_S, "AmskvFatalState firing", logs)
        wait(lambda: firing(base, "AmskvBatchErrors"), ALERT_S, "AmskvBatchErrors firing", logs)
        scraped_failures = query(base, 'max_over_time(amskv_batch_failures_total{reason="error"}[5m])')
        time.sleep(2 * float(COMPOSE_PROMETHEUS["global"]["evaluation_interval"].rstrip("s")))
        still_paging = firing(base, "AmskvFatalState")  # after the process is gone
    finally:
        stop(replica.process)
        stop(prometheus)
    assert status == 70, replica.log_tail()
    assert lived_s >= 10, f"the fatal replica exited {lived_s:.1f} s after its fatal state, before two scrapes"
    assert scraped_failures is not None and scraped_failures >= 3, scraped_failures
    assert still_paging
