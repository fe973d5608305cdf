"""Fault injection for game days and the checks: one wrapper around the engine, installed only when enabled.

With ``AMSKV_FAULT_INJECTION=1`` the service builds a ``FaultPlan`` (set through ``POST /_test/faults``)
and wraps the engine in ``FaultyEngine`` and the queue's ``take_batch`` in ``held``; without it neither
exists, and the worker and the scheduler run one code path with no test-only branch. The unit of the
faults is one engine step (one scale for every running image):

- ``fail_batches``: the next N steps raise ``InjectedFault`` (their images fail);
- ``oom_calls`` / ``oom_above_images``: the next N steps with more than that many images run out of memory;
- ``batch_delay_ms``: every step sleeps this long first (a slow device); setting it to 0 ends a sleep early;
- ``kill_worker``: the next step, or the next wait for work, ends the inference thread (``WorkerKilled``);
- ``hold_until_queued_images``: no request is admitted until that many images are queued (bounded by
  ``hold_timeout_ms``), so that requests sent one by one still start together;
- ``AMSKV_FAULT_LOAD_DELAY_S`` (a setting): the engine loads that much later (a slow start-up).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from amskv.config import VARConfig
from amskv.engine import Engine
from amskv.kvcache.policy import KVPolicy
from amskv.kvcache.storage import KVPool
from amskv.sampling import SamplingParams
from amskv.step import Cohort, StepResult
from server.jobs import BatchPlan

logger = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """Raised inside a step by the fault plan."""


class WorkerKilled(BaseException):
    """Ends the inference thread on purpose (not an Exception: no step handler may swallow it)."""


class FaultPlan:
    """The faults now in force; every wait is bounded and ``stop`` ends them, so a forgotten fault cannot hang."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._hold_deadline = 0.0
        self.fail_batches = 0
        self.oom_calls = 0
        self.oom_above_images = 1
        self.batch_delay_ms = 0
        self.hold_until_queued_images = 0
        self.hold_timeout_ms = 30_000
        self.kill_worker = False

    def update(self, **changes: Any) -> dict[str, Any]:
        with self._lock:
            for name, value in changes.items():
                if value is not None:
                    setattr(self, name, value)
            if changes.get("hold_until_queued_images"):
                self._hold_deadline = time.monotonic() + self.hold_timeout_ms / 1000
            return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def holds(self, queued_images: int) -> bool:
        """True while no request may be admitted; a hold ends (once) at its count or deadline."""
        with self._lock:
            wanted = self.hold_until_queued_images
            if not wanted:
                return False
            if queued_images < wanted and time.monotonic() < self._hold_deadline and not self._stopped.is_set():
                return True
            if queued_images < wanted:
                logger.warning("fault hold released after %d ms with %d of %d images queued",
                               self.hold_timeout_ms, queued_images, wanted)
            self.hold_until_queued_images = 0
            return False

    def stop(self) -> None:
        """End any injected delay or hold now (the worker is stopping)."""
        self._stopped.set()

    def before_step(self, images: int) -> None:
        if self.kill_worker:
            raise WorkerKilled("inference thread killed by fault injection")
        began = time.monotonic()
        while not self._stopped.is_set():  # re-read each turn: setting the delay to 0 ends it
            left = self.batch_delay_ms / 1000 - (time.monotonic() - began)
            if left <= 0:
                break
            self._stopped.wait(min(left, 0.02))
        with self._lock:
            if self.fail_batches > 0:
                self.fail_batches -= 1
                raise InjectedFault("injected step failure")
            if self.oom_calls > 0 and images > self.oom_above_images:
                self.oom_calls -= 1
                raise torch.OutOfMemoryError(f"injected out of memory for {images} images")


class FaultyEngine:
    """The engine with ``plan``'s faults before every step; everything else passes through unchanged."""

    def __init__(self, engine: Engine, plan: FaultPlan) -> None:
        self._engine, self._plan = engine, plan

    @property
    def config(self) -> VARConfig:
        return self._engine.config

    @property
    def policy(self) -> KVPolicy:
        return self._engine.policy

    def start_cohort(self, pool: KVPool, slot: int, labels: Sequence[int], seeds: Sequence[int],
                     params: Sequence[SamplingParams], tags: Sequence[object],
                     previews: Sequence[Collection[int]] | None = None, order: int = 0) -> Cohort:
        return self._engine.start_cohort(pool, slot, labels, seeds, params, tags, previews, order)

    def step(self, cohorts: Sequence[Cohort]) -> StepResult:
        self._plan.before_step(sum(c.n for c in cohorts))
        return self._engine.step(cohorts)


def delayed_load(load_engine: Callable[[], Engine], plan: FaultPlan, delay_s: float) -> Callable[[], Engine]:
    """The engine loader, ``delay_s`` slower (``AMSKV_FAULT_LOAD_DELAY_S``: a slow start-up); stopping ends it."""
    def load() -> Engine:
        if delay_s and plan._stopped.wait(delay_s):
            raise RuntimeError("stopped before the engine loaded")
        return load_engine()
    return load


def held(take_batch: Callable[..., BatchPlan | None], plan: FaultPlan) -> Callable[..., BatchPlan | None]:
    """The queue's ``take_batch`` that admits nothing while ``plan`` holds (``hold_until_queued_images``), and
    that ends the thread on ``kill_worker`` even when no image runs (an idle worker only waits here)."""
    def take(max_images: int, timeout_s: float, immediate: bool = False) -> BatchPlan | None:
        if plan.kill_worker:
            raise WorkerKilled("inference thread killed by fault injection")
        return take_batch(max_images, timeout_s, hold=plan.holds, immediate=immediate)
    return take
