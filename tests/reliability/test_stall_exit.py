"""A stalled worker's process exits promptly, and the requests stuck behind it get an answer first.

Found with AMSKV_WORKER_STALL_TIMEOUT_S=3: /livez went 503 at 2.9 s and the log said "exiting with status 70
in 2 s", but the process exited only at 98 s (the shutdown drained and waited for connections whose requests
the stuck step held), and the stuck requests got 500 at 98 s. The stall is injected with the fault
`batch_delay_ms` through POST /_test/faults, as it was found.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.test_api import Server, post

STALL_TIMEOUT_S = 3
EXIT_BOUND_S = 20  # from the stall's start to the process' exit
ENV = {"AMSKV_FAULT_INJECTION": "1", "AMSKV_WORKER_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S), "AMSKV_MAX_BATCH": "4"}


@pytest.mark.slow  # starts a real server process and waits for its stall exit (about 25 s)
def test_a_stalled_worker_exits_within_20_s_and_answers_its_stuck_requests_first(tmp_path):
    srv = Server(tmp_path, ENV)
    pool = ThreadPoolExecutor(2)
    try:
        srv.set_faults(batch_delay_ms=600_000)  # the next step hangs (for 10 minutes)
        stuck = [pool.submit(post, srv.base, {"class_labels": [k]}) for k in (1, 2)]
        srv.wait_for(lambda: srv.metric("amskv_batch_running_images") >= 1, 30, "the stuck step")
        stalled_at = time.monotonic()
        srv.wait_for(lambda: httpx.get(f"{srv.base}/livez", timeout=5).status_code == 503, 30, "/livez 503")
        status = srv.process.wait(timeout=150)
        exited_after_s = time.monotonic() - stalled_at
        answers = [f.result(timeout=5) for f in stuck]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        srv.stop()
    assert status == 70, srv.log_tail()
    assert exited_after_s <= EXIT_BOUND_S, f"exited {exited_after_s:.0f} s after the stall began"
    for answer in answers:  # answered before the exit, not reset by it
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "worker_dead", answer.text
        assert "retry-after" in answer.headers
    print(f"stalled worker: process exited with 70 after {exited_after_s:.1f} s")


def test_a_shutdown_stuck_past_the_worker_join_ends_the_process_with_the_services_code(monkeypatch):
    # The injected stall ends when the worker is stopped; a real device hang does not. Then the exit request
    # arms a deadline (the worker join + a margin) after which the process flushes its logs and exits.
    import threading
    from types import SimpleNamespace

    import uvicorn

    import server.worker
    from server import cli

    exited = threading.Event()
    codes: list[int] = []
    monkeypatch.setattr(server.worker, "WORKER_JOIN_S", 0.2)
    monkeypatch.setattr(cli, "EXIT_MARGIN_S", 0.0)
    monkeypatch.setattr(cli.os, "_exit", lambda code: (codes.append(code), exited.set()))
    app = SimpleNamespace(state=SimpleNamespace(service=SimpleNamespace(exit_code=70)))
    draining = cli.DrainingServer(uvicorn.Config(app), app)
    app.state.request_exit()  # what the app calls on a fatal state
    assert draining.should_exit
    assert exited.wait(5), "the process was not ended"
    assert codes == [70]
