"""HAProxy in front of real `amskv serve` replicas, all on 127.0.0.1.

The balancer is Debian's haproxy binary (from .ci/install-ops-tools.sh) running the configuration that
scripts/haproxy_config.py renders, the same generator as the compose stack's docker/haproxy/haproxy.cfg. The
replicas are the real server (tests/server/test_api.py's harness, demo model, one torch thread each); the load
is scripts/loadgen.py as a subprocess, bounded in count and time.
"""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from scripts.haproxy_config import render
from tests.reliability.conftest import finish_loadgen, metric_series, metric_total, requests_with_status, start_loadgen
from tests.server.test_api import Server, free_port
from tests.tools import find_tool

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

REPO = Path(__file__).resolve().parents[2]
COMPOSE_CONFIG = REPO / "docker/haproxy/haproxy.cfg"
# Per replica: batches of 8, room for 64 queued images, so 16 concurrent one-image clients never fill the
# survivor's queue when one replica goes away; a short keep-alive so the uvicorn limit shows within seconds.
REPLICA_ENV = {"AMSKV_MAX_BATCH": "8", "AMSKV_MAX_QUEUE_IMAGES": "64", "AMSKV_MAX_IMAGES_PER_REQUEST": "8",
               "AMSKV_MAX_QUEUE_DELAY_MS": "20", "AMSKV_DRAIN_TIMEOUT_S": "20", "AMSKV_KEEPALIVE_TIMEOUT_S": "1",
               # the balancer checks every 500 ms, fall 2: out of rotation before the drain refuses anything
               "AMSKV_DRAIN_NOTICE_S": "2"}
LOAD_REQUESTS, LOAD_CONCURRENCY = 240, 16
# Bounds for "closed by the server", not performance figures: the configured timeout is 2 s.
HEADER_TIMEOUT_S, CLOSE_BOUND_S = 2, 30


def haproxy() -> str:
    return find_tool("haproxy")


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)


class Balancer:
    """haproxy in the foreground (-db) on a free loopback port; its request log goes to a file."""

    def __init__(self, tmp_path: Path, servers: list[tuple[str, str]], **timeouts: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp_path / f"haproxy-{self.port}.cfg"
        self.config.write_text(render(servers, bind=f"127.0.0.1:{self.port}", check_interval="500ms", **timeouts))
        checked = check_config(self.config)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.log = tmp_path / f"haproxy-{self.port}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([haproxy(), "-db", "-f", str(self.config)],
                                            stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"haproxy did not listen on {self.port}:\n{self.log.read_text()}")

    def wait_all_up(self, count: int) -> None:
        """Until every replica passed its /readyz checks (rise 2): each of `count` requests gets a 200."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200 for _ in range(count)):
                return
            time.sleep(0.2)
        pytest.fail("replicas never became ready behind the balancer")

    def request_log(self) -> list[dict]:
        """One entry per proxied request: server, status, termination state, retries."""
        pattern = re.compile(r"\S+ (?P<backend>\S+)/(?P<server>\S+) (?P<status>-?\d+) (?P<state>\S+) "
                             r"retries=(?P<retries>\+?\d+) Tt=\S+ (?P<method>\S+) (?P<path>\S+)")
        return [m.groupdict() for m in map(pattern.search, self.log.read_text(errors="replace").splitlines()) if m]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def start_replicas(tmp_path: Path, count: int = 2, env: dict[str, str] | None = None) -> list[Server]:
    with ThreadPoolExecutor(count) as pool:  # model loads overlap
        return list(pool.map(lambda _: Server(tmp_path, env or REPLICA_ENV), range(count)))


def behind(tmp_path: Path, replicas: list[Server]) -> Balancer:
    balancer = Balancer(tmp_path, [(f"api-{i}", f"127.0.0.1:{r.port}") for i, r in enumerate(replicas)])
    balancer.wait_all_up(len(replicas))
    return balancer


def closed_within(sock: socket.socket, bound_s: float) -> tuple[bool, bytes]:
    """Read until the peer closes (True) or `bound_s` passes (False); returns what was read too."""
    sock.settimeout(bound_s)
    received = b""
    deadline = time.monotonic() + bound_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                return True, received
            received += chunk
    except (socket.timeout, TimeoutError):
        return False, received
    except ConnectionResetError:
        return True, received
    return False, received


# --- configuration ------------------------------------------------------------------------------------

def test_compose_balancer_config_validates_and_is_the_generators_output():
    result = check_config(COMPOSE_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    generated = subprocess.run([sys.executable, str(REPO / "scripts/haproxy_config.py"), "--compose"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert COMPOSE_CONFIG.read_text() == generated, "regenerate: python scripts/haproxy_config.py --compose"
    for line in ("balance leastconn", "option httpchk GET /readyz", "retry-on conn-failure empty-response\n",
                 "option redispatch 1", "option http-buffer-request", "timeout http-request 10s",
                 "option abortonclose"):
        assert line in generated


def test_haproxy_rejects_a_broken_config(tmp_path):
    broken = tmp_path / "broken.cfg"
    broken.write_text(render([("a", "127.0.0.1:1")], bind="127.0.0.1:1").replace("balance leastconn",
                                                                                  "balance fewest"))
    assert check_config(broken).returncode != 0


# --- slow and idle clients are closed ---------------------------------------------------------------------

def test_a_half_sent_request_header_is_closed_by_the_balancer(tmp_path):
    # No replica is needed: the frontend waits for the header before it picks a server.
    balancer = Balancer(tmp_path, [("api-0", f"127.0.0.1:{free_port()}")],
                        timeout_http_request=f"{HEADER_TIMEOUT_S}s")
    try:
        with socket.create_connection(("127.0.0.1", balancer.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
            closed, answer = closed_within(sock, CLOSE_BOUND_S)
    finally:
        balancer.stop()
    assert closed, f"the balancer kept a half-sent request open for {CLOSE_BOUND_S} s"
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_idle_connections_are_closed_by_the_balancer_and_by_the_replica(tmp_path):
    (replica,) = start_replicas(tmp_path, 1)
    balancer = behind(tmp_path, [replica])
    try:
        for port in (balancer.port, replica.port):  # balancer: timeout http-keep-alive; replica: uvicorn's
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                closed, answer = closed_within(sock, CLOSE_BOUND_S)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert closed, f"an idle keep-alive connection to port {port} stayed open for {CLOSE_BOUND_S} s"
    finally:
        balancer.stop()
        replica.stop()


# --- two replicas under load ------------------------------------------------------------------------------

def load(balancer: Balancer) -> "subprocess.Popen":
    # Bounded: a fixed count, 60 s per request, no new request after 120 s; only 127.0.0.1.
    return start_loadgen(balancer.base, "--requests", str(LOAD_REQUESTS), "--concurrency", str(LOAD_CONCURRENCY),
                         "--timeout", "60", "--max-time", "120")


def answered(replica: Server) -> float:
    return requests_with_status(metric_series(replica), 200)


def test_load_is_shared_and_the_replicas_counters_sum_to_what_the_clients_got(tmp_path):
    replicas = start_replicas(tmp_path)
    balancer = behind(tmp_path, replicas)
    try:
        before = [metric_series(r) for r in replicas]
        summary = finish_loadgen(load(balancer), timeout_s=240)
        after = [metric_series(r) for r in replicas]
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()
    assert summary["status_counts"] == {"200": LOAD_REQUESTS} and summary["lost"] == 0, summary
    served = [requests_with_status(a, 200) - requests_with_status(b, 200) for a, b in zip(after, before)]
    images = [metric_total(a, "amskv_images_generated_total") - metric_total(b, "amskv_images_generated_total")
              for a, b in zip(after, before)]
    assert sum(served) == LOAD_REQUESTS and all(s > 0 for s in served), served
    assert sum(images) == summary["images"] == LOAD_REQUESTS, images


def test_sigterm_to_one_replica_under_load_fails_no_request(tmp_path):
    replicas = start_replicas(tmp_path)
    victim, survivor = replicas
    balancer = behind(tmp_path, replicas)
    try:
        survivor_before = metric_series(survivor)
        running = load(balancer)
        victim.wait_for(lambda: answered(victim) >= 20, 120, "20 answers from the replica to stop")
        victim.process.send_signal(signal.SIGTERM)  # a rolling restart: drain, then exit
        exit_status = victim.process.wait(timeout=60)
        summary = finish_loadgen(running, timeout_s=240)
        survivor_after = metric_series(survivor)
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()
    assert exit_status in (0, -signal.SIGTERM), victim.log_tail()
    assert summary["status_counts"] == {"200": LOAD_REQUESTS} and summary["lost"] == 0, summary
    # The stopped replica's last account (logged after its connections closed) plus the survivor's counters
    # equal the 200s the clients got: every answer came from exactly one replica, none was lost or doubled.
    account = re.search(r"generate requests answered by status (\{.*\})", victim.log.read_text(errors="replace"))
    assert account, victim.log_tail()
    by_victim = json.loads(account.group(1)).get("200", 0)
    by_survivor = requests_with_status(survivor_after, 200) - requests_with_status(survivor_before, 200)
    assert by_victim >= 20 and by_victim + by_survivor == LOAD_REQUESTS, (by_victim, by_survivor)


def test_sigkill_to_one_replica_fails_at_most_its_requests_in_flight_with_a_clean_5xx(tmp_path):
    replicas = start_replicas(tmp_path)
    victim, survivor = replicas
    balancer = behind(tmp_path, replicas)
    try:
        running = load(balancer)
        victim.wait_for(lambda: answered(victim) >= 20, 120, "20 answers from the replica to kill")
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=30)
        summary = finish_loadgen(running, timeout_s=240)
        requests = balancer.request_log()
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()
    statuses = summary["status_counts"]
    failed = summary["sent"] - statuses.get("200", 0)
    # Every request got an HTTP answer (no reset, no client timeout); a failure is a 5xx a client can retry,
    # and there are no more of them than requests could be in flight on the killed replica.
    assert summary["sent"] == LOAD_REQUESTS and summary["lost"] == 0 and summary["refused"] == 0, summary
    assert set(statuses) <= {"200", "502", "503", "504"}, summary
    assert failed <= LOAD_CONCURRENCY, summary
    generate = [r for r in requests if r["path"] == "/v1/generate"]
    retried = [r for r in generate if r["retries"] != "0"]
    print(f"after SIGKILL: {failed} failed, {len(retried)} retried on the other replica by the balancer")
    assert len(generate) == LOAD_REQUESTS, len(generate)
    failures = [r for r in generate if r["status"] != "200"]
    assert len(failures) == failed and all(r["server"] == "api-0" for r in failures), failures


# --- a client that leaves is seen by the replica ---------------------------------------------------------

ABANDONED = 4


def raw_generate(port: int, body: dict) -> socket.socket:
    """A generate request sent whole on a raw socket, its answer never read."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_requests_abandoned_while_queued_behind_the_balancer_are_cancelled_on_the_replica(tmp_path):
    # Without `option abortonclose` HAProxy kept the replica's side open after the client left: the abandoned
    # requests were generated and counted 200.
    replica = Server(tmp_path, {**REPLICA_ENV, "AMSKV_FAULT_INJECTION": "1"})
    balancer = behind(tmp_path, [replica])
    pool = ThreadPoolExecutor(1)
    try:
        replica.set_faults(batch_delay_ms=300)  # every scale step is slow: the first request fills the batch
        blocker = pool.submit(httpx.post, f"{balancer.base}/v1/generate",
                              json={"class_labels": [1], "n": 8, "seed": 1}, timeout=120)
        replica.wait_for(lambda: replica.metric("amskv_batch_running_images") >= 8, 60, "a full running batch")
        sockets = [raw_generate(balancer.port, {"class_labels": [2], "n": 8, "seed": 2 + i})
                   for i in range(ABANDONED)]
        replica.wait_for(lambda: replica.metric("amskv_queue_requests") >= ABANDONED, 30, "the requests queued")
        for sock in sockets:
            sock.close()  # the clients give up while their requests wait
        replica.wait_for(lambda: replica.metric("amskv_requests_cancelled_total") >= ABANDONED, 30,
                         f"{ABANDONED} cancellations on the replica")
        replica.set_faults(batch_delay_ms=0)
        assert blocker.result(timeout=120).status_code == 200
        answered_200 = requests_with_status(metric_series(replica), 200)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        balancer.stop()
        replica.stop()
    assert answered_200 == 1, "an abandoned request was generated anyway"


# --- a refusal is counted once per client request ---------------------------------------------------------

def queue_full_refusals(replica: Server) -> float:
    return metric_series(replica).get('amskv_requests_rejected_total{reason="queue_full"}', 0.0)


def test_queue_full_is_refused_once_per_client_request_not_once_per_balancer_retry(tmp_path):
    # With `retry-on ... 503` every replica counted the same client's queue_full: 172 refusals were counted
    # against 43 that clients saw. Now a 503 is passed on after one attempt, so the counts agree.
    env = {**REPLICA_ENV, "AMSKV_MAX_QUEUE_IMAGES": "8", "AMSKV_FAULT_INJECTION": "1"}
    replicas = start_replicas(tmp_path, env=env)
    balancer = behind(tmp_path, replicas)
    try:
        for replica in replicas:
            replica.set_faults(batch_delay_ms=50)  # slow steps: 48 clients overflow 2 × (8 running + 8 queued)
        before = sum(queue_full_refusals(r) for r in replicas)
        summary = finish_loadgen(start_loadgen(balancer.base, "--requests", "150", "--concurrency", "48",
                                               "--timeout", "60", "--max-time", "120"), timeout_s=240)
        counted = sum(queue_full_refusals(r) for r in replicas) - before
        requests = [r for r in balancer.request_log() if r["path"] == "/v1/generate"]
    finally:
        balancer.stop()
        for replica in replicas:
            replica.stop()
    seen = summary["error_codes"].get("queue_full", 0)
    assert summary["lost"] == 0 and set(summary["status_counts"]) <= {"200", "503"}, summary
    assert seen > 0, f"the load never filled the queues: {summary}"
    assert counted == seen, f"replicas counted {counted} queue_full refusals, clients saw {seen}"
    assert all(r["retries"] == "0" for r in requests if r["status"] == "503"), requests


# --- test-only endpoints stay behind the balancer ----------------------------------------------------------

def test_fault_injection_cannot_be_reached_through_the_balancer(tmp_path):
    replica = Server(tmp_path, {**REPLICA_ENV, "AMSKV_FAULT_INJECTION": "1"})
    balancer = behind(tmp_path, [replica])
    try:
        through = httpx.post(f"{balancer.base}/_test/faults", json={"kill_worker": True}, timeout=10)
        direct = httpx.post(f"{replica.base}/_test/faults", json={}, timeout=10)  # enabled on the replica itself
        alive = httpx.get(f"{replica.base}/readyz", timeout=10).status_code
    finally:
        balancer.stop()
        replica.stop()
    assert through.status_code == 404 and direct.status_code == 200
    assert alive == 200  # the kill never reached the replica
    log = replica.log.read_text(errors="replace")
    assert "AMSKV_FAULT_INJECTION is on" in log and "WARNING" in log.split("AMSKV_FAULT_INJECTION is on")[0][-200:]
