"""scripts/two-replicas.sh as a user runs it: SIGTERM to one replica under load loses no request, and the
balancer and the other replica stay up (the script used to stop everything when one replica exited).

The script starts two real `amskv serve` replicas (demo model, one torch thread each) and Debian's haproxy on
free loopback ports; the load is scripts/loadgen.py, bounded in count and time.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.ops.test_balancer import REPLICA_ENV, haproxy
from tests.reliability.conftest import finish_loadgen, metric_series, requests_with_status, start_loadgen
from tests.server.test_api import free_port

pytestmark = pytest.mark.slow  # every test here takes ~5 s or more on two cores

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts/two-replicas.sh"
LOAD_REQUESTS, LOAD_CONCURRENCY = 200, 16
START_S = 240  # two model loads on two shared cores


class TwoReplicas:
    """The script in its own process group; its stdout in a file, read for the pids it prints."""

    def __init__(self, tmp_path: Path) -> None:
        self.balancer_port, *self.replica_ports = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.balancer_port}"
        self.log_dir = tmp_path / "replicas"
        self.out = tmp_path / "two-replicas.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMSKV_")}
        env.update(REPLICA_ENV, AMSKV_DRAIN_NOTICE_S="3", AMSKV_TORCH_THREADS="1", OMP_NUM_THREADS="1",
                   PYTHON=sys.executable,
                   BALANCER_PORT=str(self.balancer_port), REPLICA_PORTS=" ".join(map(str, self.replica_ports)),
                   LOG_DIR=str(self.log_dir), PATH=f"{Path(haproxy()).parent}:{env.get('PATH', '')}")
        with self.out.open("wb") as out:
            self.process = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_S
        while "Ctrl-C stops everything" not in self.output():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"the script did not start in {START_S} s:\n{self.output()}"
            time.sleep(0.5)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def pid(self, name: str) -> int:
        return int(re.search(rf"{name}: pid (\d+)", self.output()).group(1))

    def wait_all_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(httpx.get(f"{self.base}/readyz", timeout=5).status_code == 200 for _ in range(2)):
                return
            time.sleep(0.2)
        pytest.fail("the replicas never became ready behind the balancer")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_sigterm_to_one_replica_under_load_loses_no_request_and_the_rest_stays_up(tmp_path):
    stack = TwoReplicas(tmp_path)
    stopped_status = None
    try:
        stack.wait_all_up()
        victim, survivor, balancer = (stack.pid(name) for name in ("replica api-0", "replica api-1", "balancer"))
        victim_url = f"http://127.0.0.1:{stack.replica_ports[0]}"
        running = start_loadgen(stack.base, "--requests", str(LOAD_REQUESTS), "--concurrency",
                                str(LOAD_CONCURRENCY), "--timeout", "60", "--max-time", "120")
        deadline = time.monotonic() + 120
        while requests_with_status(metric_series(SimpleNamespace(base=victim_url)), 200) < 20:
            assert time.monotonic() < deadline and running.poll() is None, "the victim never answered 20"
            time.sleep(0.1)
        os.kill(victim, signal.SIGTERM)  # a rolling restart by hand: the replica drains, then exits
        summary = finish_loadgen(running, timeout_s=240)
        deadline = time.monotonic() + 60
        while alive(victim) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(victim), "the SIGTERM'd replica did not exit"
        time.sleep(1)  # the script has seen the exit; it must not have stopped the others
        still_up = {"script": stack.process.poll() is None, "survivor": alive(survivor), "balancer": alive(balancer)}
        try:  # the balancer answers, and reaches the survivor
            after = httpx.get(f"{stack.base}/readyz", timeout=5).status_code
        except httpx.HTTPError as exc:
            after = repr(exc)
    finally:
        stopped_status = stack.stop()
    assert summary["status_counts"] == {"200": LOAD_REQUESTS} and summary["lost"] == 0, summary
    assert all(still_up.values()), (still_up, stack.output())
    assert after == 200, "the balancer no longer reaches the surviving replica"
    assert "routes around it (1 left)" in stack.output(), stack.output()
    assert stopped_status == 0, stack.output()  # SIGTERM to the script stops the rest cleanly
