"""Stand-ins the server tests share: a clock and jobs driven by hand, a batcher with no worker, and the app
served in this process (no uvicorn, no socket).

The batcher tests, its scrape-signal tests and the worker tests used to import these from each other's
modules; the in-process API tests (tests/server/test_contract.py, tests/reliability/test_bad_input.py) share
one app with the bundled demo model.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import Counter

from server.app import create_app
from server.batcher import Batcher
from server.jobs import BatchPlan, Job, JobResult
from server.settings import Settings

WAIT_S = 10  # every wait is bounded: a deadlock fails the test instead of hanging it
READY_WAIT_S = 180  # load and warm-up of the demo model on two busy cores
# Small limits, as the real-process tests' SERVER_ENV: batching, splitting and the per-request cap show up
# with a handful of images.
API_LIMITS: dict[str, Any] = {"max_batch": 4, "max_queue_images": 16, "max_images_per_request": 16,
                              "max_queue_delay_ms": 20}


class FakeClock:
    """Monotonic seconds that only move when a test sets ``now``."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_job(images: int = 1, *, priority: int = 1, arrival: float = 100.0, timeout_s: float = 60.0,
             first_label: int = 0) -> Job:
    """A job of ``images`` images with consecutive labels and seeds; no sampling parameters (no engine runs it)."""
    return Job(id=f"job{first_label}", labels=[first_label + i for i in range(images)],
               seeds=[1000 + i for i in range(images)], params=None, priority=priority,
               arrival=arrival, deadline=arrival + timeout_s)


def make_batcher(clock: Callable[[], float] | None = None, *, max_queue_images: int = 64,
                 delay_s: float = 0.0) -> Batcher:
    return Batcher(max_queue_images=max_queue_images, max_queue_delay_s=delay_s, clock=clock or FakeClock())


def complete(batcher: Batcher, plan: BatchPlan, outputs: list[Any], seconds: float) -> None:
    """Hand back one output per image of ``plan`` as if it ran as one step: an image, or its exception."""
    assert len(outputs) == plan.num_images
    position = 0
    for piece in plan.slices:
        batcher.note_step({piece.job: piece.count}, plan.num_images, seconds)
        for k, output in enumerate(outputs[position:position + piece.count]):
            if isinstance(output, BaseException):
                batcher.fail(piece.job, 1, output)
            else:
                batcher.deliver(piece.job, piece.start + k, output)
        position += piece.count


def counter(metric: Counter, **labels: str) -> float:
    """A counter's value now (one label set), read from the process's own registry."""
    return (metric.labels(**labels) if labels else metric)._value.get()


def answer(job: Job, timeout_s: float = WAIT_S) -> JobResult:
    """The job's result (raising its exception), failing the test if nothing answers it within timeout_s."""
    try:
        return job.future.result(timeout=timeout_s)
    except FutureTimeout:
        pytest.fail(f"job {job.id} ({job.status.name}) got no answer within {timeout_s} s: batcher or worker stuck")


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


@contextmanager
def in_process_app(**settings: Any) -> Iterator[TestClient]:
    """The whole app (middleware, routes, lifespan, worker thread, demo model) behind an in-process client,
    ready: for what a request and its JSON show. Signals, sockets, scrapes and browsers need a real process
    (tests/server/test_api.py's Server).

    ``settings`` are Settings fields; an AMSKV_* variable of the outer environment is not read, as in the
    real-process harness.
    """
    with pytest.MonkeyPatch.context() as env:
        for name in [name for name in os.environ if name.startswith("AMSKV_")]:
            env.delenv(name)
        app = create_app(Settings(**settings))
    exits: list[bool] = []
    # A fatal state asks the server to exit; in this process that must fail the test, not SIGTERM pytest.
    app.state.request_exit = lambda: exits.append(True)
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + READY_WAIT_S
        while client.get("/readyz").status_code != 200:
            if exits or time.monotonic() > deadline:
                pytest.fail(f"the in-process app did not become ready: {client.get('/readyz').json()}")
            time.sleep(0.05)
        yield client
    assert not exits, "the in-process app asked to exit (a fatal state)"
