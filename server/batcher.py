"""The queue between HTTP handlers and the inference thread: admission order, deadlines, results.

Thread-safe and torch-free. Handlers call `submit` and `cancel` from the event loop; the single
inference thread calls `take_batch` (the images to admit now) and hands results back image by image
(`deliver`, `fail`, `dropped`). Jobs are served by (priority, arrival); a job larger than the room
is split, and its remainder stays at the front so no later arrival of the same priority overtakes it.
While images run, the worker takes newcomers at every scale boundary (`immediate=True`); an idle
worker waits up to `max_queue_delay_s` for more requests to start together.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from server import metrics
from server.errors import ApiError, Unavailable, deadline_error
from server.jobs import BatchPlan, BatchSlice, Job, JobStatus

HOLD_POLL_S = 0.02  # how often a held queue re-asks its hold (a hold can end by time or by being reset)


class ClientGone(Exception):
    """Set on the future of a job whose client disconnected or gave up; nobody reads it."""


class Batcher:
    def __init__(self, *, max_queue_images: int, max_queue_delay_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_queue_images = max_queue_images
        self.max_queue_delay_s = max_queue_delay_s
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: list[Job] = []  # sorted by (priority, seq); holds jobs with images not yet scheduled
        self._running: dict[Job, int] = {}  # images of each job that are admitted and not yet answered
        self._seq = itertools.count()
        self._queued_images = 0
        self._draining = False
        self._closed: ApiError | None = None
        self._seconds_per_image = 0.0  # moving average, only for the Retry-After hint

    # --- event-loop side ------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job or raise Unavailable (queue_full, draining, or the closing error).

        A refusal is counted where the error is answered (server/errors.py), like every other refusal."""
        with self._cond:
            if self._closed is not None:
                raise Unavailable(self._closed.message, code=self._closed.code, retry_after_s=30)
            if self._draining:
                raise Unavailable("server is draining; retry on another replica", code="draining",
                                  retry_after_s=5)
            if self._queued_images + job.num_images > self.max_queue_images:
                raise Unavailable(
                    f"queue is full ({self._queued_images} of {self.max_queue_images} images waiting)",
                    code="queue_full", retry_after_s=self._retry_after_s())
            job.seq = next(self._seq)
            job.admitted = True
            self._queue.append(job)
            self._queue.sort(key=lambda j: (j.priority, j.seq))
            self._queued_images += job.num_images
            metrics.REQUEST_IMAGES.observe(job.num_images)
            self._publish()
            self._cond.notify_all()

    def cancel(self, job: Job, error: BaseException | None = None) -> None:
        """Drop a job whose client went away or whose deadline passed; results still running are discarded."""
        with self._cond:
            if job.status.is_finished():
                return
            stage = "queued" if job.status == JobStatus.QUEUED else "running"
            if isinstance(error, ApiError) and error.code in ("queue_timeout", "generation_timeout",
                                                              "deadline_exceeded"):
                metrics.TIMED_OUT.labels(stage=stage).inc()
                self._finish(job, JobStatus.EXPIRED, error)
            else:
                metrics.CANCELLED.labels(stage=stage).inc()
                self._finish(job, JobStatus.CANCELLED, error or ClientGone())
            self._publish()
            self._cond.notify_all()

    def start_draining(self) -> None:
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def is_idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._running

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def oldest_queued_age_s(self) -> float:
        """Seconds the longest-waiting queued request has waited (0 with an empty queue); read at scrape."""
        with self._cond:
            if not self._queue:
                return 0.0
            return max(0.0, self._clock() - min(job.arrival for job in self._queue))

    @property
    def queued_requests(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def running_images(self) -> int:
        """Images admitted to the device and not yet answered."""
        with self._cond:
            return sum(self._running.values())

    @property
    def running_requests(self) -> int:
        """Requests with images on the device now."""
        with self._cond:
            return len(self._running)

    # --- inference-thread side ------------------------------------------------------------------
    def take_batch(self, max_images: int, timeout_s: float,
                   hold: Callable[[int], bool] | None = None, immediate: bool = False) -> BatchPlan | None:
        """Block until images should start, then return them; None after `timeout_s` or once closed.

        They start when the queue holds `max_images` images, when the oldest waiting job has waited
        `max_queue_delay_s`, at once while draining, and with `immediate` (images already run, so the
        next scale boundary is moments away) as soon as anything is queued. `hold` (fault injection,
        server/faults.py) is asked with the queued image count; while it answers True nothing starts,
        not even while draining, and deadlines still expire.
        """
        if max_images < 1:
            raise ValueError("max_images must be at least 1")
        give_up = self._clock() + timeout_s
        with self._cond:
            while True:
                now = self._clock()
                self._expire(now)
                if self._closed is not None:
                    return None
                if self._queue and hold is not None and hold(self._queued_images):
                    wake = min(now + HOLD_POLL_S, give_up)  # submit() wakes us sooner
                elif self._queue:
                    oldest = min(j.arrival for j in self._queue)
                    if (immediate or self._queued_images >= max_images or self._draining
                            or now - oldest >= self.max_queue_delay_s):
                        return self._form(max_images, now)
                    wake = min(oldest + self.max_queue_delay_s, give_up)
                else:
                    wake = give_up
                if now >= give_up:
                    return None
                self._cond.wait(max(wake - now, 0.0005))

    def note_step(self, images_by_job: dict[Job, int], step_images: int, seconds: float) -> None:
        """A step ran these jobs' images beside others (``step_images`` in all), for their usage figures."""
        with self._cond:
            for job in images_by_job:
                job.inference_time_s += seconds
                job.batch_images = max(job.batch_images, step_images)
            if step_images:
                per_image = seconds / step_images
                self._seconds_per_image = per_image if not self._seconds_per_image else (
                    0.8 * self._seconds_per_image + 0.2 * per_image)

    def deliver(self, job: Job, index: int, image: Any) -> None:
        """Image ``index`` of ``job`` is done; the job's answer goes out with its last image."""
        with self._cond:
            self._release(job, 1)
            if not job.status.is_finished():
                job.outputs[index] = image
                job.finished_images += 1
                if job.finished_images == job.num_images:
                    job.status = JobStatus.DONE
                    if not job.future.done():
                        job.future.set_result(job.result())
            self._publish()
            self._cond.notify_all()

    def fail(self, job: Job, count: int, error: BaseException) -> None:
        """``count`` running images of ``job`` failed with ``error``: the job fails (its other images are
        dropped by the worker at the next boundary, as for a cancelled job)."""
        with self._cond:
            self._release(job, count)
            if not job.status.is_finished():
                self._finish(job, JobStatus.FAILED, error)
            self._publish()
            self._cond.notify_all()

    def dropped(self, job: Job, count: int) -> None:
        """``count`` running images of a finished (cancelled, expired or failed) job left the device."""
        with self._cond:
            self._release(job, count)
            self._publish()
            self._cond.notify_all()

    def close(self, error: ApiError) -> None:
        """Fail every queued and running job with `error` and refuse new ones (worker gone or shut down)."""
        with self._cond:
            self._closed = error
            jobs = list(self._queue) + list(self._running)
            for job in jobs:
                if not job.status.is_finished():
                    self._finish(job, JobStatus.FAILED, error)
            self._running = {}
            self._publish()
            self._cond.notify_all()

    # --- internals (caller holds the lock) ------------------------------------------------------
    def _form(self, max_images: int, now: float) -> BatchPlan:
        slices, room = [], max_images
        for job in list(self._queue):
            if room == 0:
                break
            take = min(room, job.pending_images)
            slices.append(BatchSlice(job, job.next_image, take))
            if job.next_image == 0 and take < job.num_images:
                metrics.BATCH_SPLITS.inc()
            job.next_image += take
            job.batches += 1
            self._running[job] = self._running.get(job, 0) + take
            room -= take
            self._queued_images -= take
            if job.started_at is None:
                job.started_at = now
                metrics.QUEUE_WAIT.observe(now - job.arrival)
            job.status = JobStatus.RUNNING
            if job.pending_images == 0:
                self._queue.remove(job)
        self._publish()
        return BatchPlan(slices)

    def _expire(self, now: float) -> None:
        for job in [j for j in self._queue if j.deadline <= now]:
            stage = "queued" if job.status == JobStatus.QUEUED else "running"
            metrics.TIMED_OUT.labels(stage=stage).inc()
            error = deadline_error(stage == "queued", job.client_timeout_ms, self._retry_after_s())
            self._finish(job, JobStatus.EXPIRED, error)
        self._publish()

    def _release(self, job: Job, count: int) -> None:
        left = self._running.get(job, 0) - count
        if left > 0:
            self._running[job] = left
        else:
            self._running.pop(job, None)

    def _finish(self, job: Job, status: JobStatus, error: BaseException) -> None:
        if job in self._queue:
            self._queue.remove(job)
            self._queued_images -= job.pending_images
        job.status = status
        if not job.future.done():
            job.future.set_exception(error)

    def _retry_after_s(self) -> int:
        estimate = self._queued_images * self._seconds_per_image
        return int(min(60, max(1, math.ceil(estimate))))

    def _publish(self) -> None:
        metrics.QUEUE_REQUESTS.set(len(self._queue))
        metrics.QUEUE_IMAGES.set(self._queued_images)
