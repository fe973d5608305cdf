"""The service object the routes share: settings, batcher, worker, class names and lifecycle state."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from amskv.classes import ClassCatalog
from server import metrics
from server.batcher import Batcher
from server.errors import Unavailable
from server.faults import FaultPlan
from server.settings import Settings
from server.worker import InferenceWorker


class Service:
    """Everything the routes need: settings, batcher, worker, class names and lifecycle state."""

    def __init__(self, settings: Settings, worker_factory: Callable[[Batcher, FaultPlan | None], InferenceWorker]):
        self.settings = settings
        self.batcher = Batcher(max_queue_images=settings.max_queue_images,
                               max_queue_delay_s=settings.max_queue_delay_ms / 1000)
        self.faults = FaultPlan() if settings.fault_injection else None
        self.worker = worker_factory(self.batcher, self.faults)
        self.catalog: ClassCatalog | None = None
        self.startup_error: str | None = None
        self.exit_code = 0  # set when the service asks the server to exit (cli.run returns it)

    def fatal_reason(self) -> str | None:
        """Why this process must be replaced (/livez 503, then exit), or None while it can still serve."""
        if self.startup_error is not None:
            return self.startup_error
        if self.worker.died:
            return self.worker.death_reason or "the inference worker died"
        stalled_s = self.worker.stalled_s()
        if stalled_s > self.settings.worker_stall_timeout_s:
            return (f"one batch has run for {stalled_s:.0f} s, over AMSKV_WORKER_STALL_TIMEOUT_S="
                    f"{self.settings.worker_stall_timeout_s:.0f}")
        return None

    def health(self) -> tuple[str, str | None]:
        fatal = self.fatal_reason()
        if fatal is not None:
            return "UNHEALTHY", fatal
        if self.batcher.draining:
            return "DRAINING", None
        if not self.worker.ready or self.catalog is None:
            return "STARTING", None
        return "READY", None

    def require_loaded(self) -> None:
        """Model-describing routes answer 503 not_ready until load and warm-up are done."""
        if self.worker.info is None or self.catalog is None:
            raise Unavailable("the model is still loading; retry shortly", code="not_ready", retry_after_s=5)

    def check_accepting(self) -> None:
        """Raise the 503 that refuses a new request now (the error handlers count it by its code)."""
        status, detail = self.health()
        if status == "READY":
            return
        if status == "DRAINING":
            raise Unavailable("server is draining; retry on another replica", code="draining", retry_after_s=5)
        code = "worker_dead" if status == "UNHEALTHY" else "not_ready"
        raise Unavailable(detail or "server is not ready yet", code=code,
                          retry_after_s=30 if code == "worker_dead" else 5)

    async def drain(self) -> None:
        """Refuse new work and wait (at most drain_timeout_s) for queued and running work to finish.

        Whatever is left at the deadline is answered with 503 draining, so no accepted request is
        still waiting when uvicorn starts closing connections.
        """
        self.batcher.start_draining()
        metrics.DRAINING.set(1)
        metrics.READY.set(0)
        give_up = time.monotonic() + self.settings.drain_timeout_s
        while not self.batcher.is_idle() and not self.worker.died and time.monotonic() < give_up:
            await asyncio.sleep(0.05)
        if not self.batcher.is_idle():
            self.batcher.close(Unavailable("server shut down before this request was served",
                                           code="draining", retry_after_s=5))
            await asyncio.sleep(0.05)  # let the handlers send their 503s before connections close
