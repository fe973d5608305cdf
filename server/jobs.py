"""Plain data passed between the HTTP layer, the batcher and the worker.

A `Job` is one accepted request, counted in images. The batcher cuts jobs into `BatchSlice`s; a
`BatchPlan` is the slices admitted together at one scale boundary. The job's `future` is a thread-safe
`concurrent.futures.Future`: the worker thread resolves it, the event loop awaits it with
`asyncio.wrap_future`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

_plan_ids = itertools.count(1)

# Where the route keeps the request's job in the ASGI scope: the access log reads its images and times
# (server/middleware.py), and the error handlers tell a refusal from an admitted job's failure (server/errors.py).
JOB_SCOPE_KEY = "amskv.job"


class JobStatus(IntEnum):
    """Live states first; everything from DONE on is finished."""

    QUEUED = 0
    RUNNING = 1  # at least one image is scheduled or generated; more may still be queued
    DONE = 2
    FAILED = 3
    CANCELLED = 4
    EXPIRED = 5

    def is_finished(self) -> bool:
        return self >= JobStatus.DONE


@dataclass(frozen=True)
class JobResult:
    images: list[Any]  # one uint8 array (H, W, C) per image, in request order
    queue_time_s: float
    inference_time_s: float
    batch_images: int
    batches: int


@dataclass(eq=False)
class Job:
    id: str
    labels: list[int]  # one entry per image
    seeds: list[int]  # one entry per image
    params: Any  # amskv.sampling.SamplingParams shared by every image of the job
    priority: int
    arrival: float  # monotonic seconds
    deadline: float  # monotonic seconds
    seq: int = 0  # arrival order, set by the batcher
    # Set by Batcher.submit: from then on an error is the job's outcome, not a refusal of the request.
    admitted: bool = False
    client_timeout_ms: int | None = None  # the client's timeout_ms when it set the deadline (shorter than the server's)
    status: JobStatus = JobStatus.QUEUED
    next_image: int = 0  # first image not yet handed to a batch
    future: Future = field(default_factory=Future)
    outputs: list[Any] = field(default_factory=list)
    finished_images: int = 0
    started_at: float | None = None
    inference_time_s: float = 0.0
    batch_images: int = 0
    batches: int = 0
    first_preview_at: float | None = None  # monotonic time the first preview was handed over
    preview_scales: frozenset[int] = frozenset()  # scales whose running image the client wants to see
    # Called on the inference thread as on_preview(image_index, scale, image) for those scales (streaming).
    on_preview: Callable[[int, int, Any], None] | None = None

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.seeds) or not self.labels:
            raise ValueError("a job needs one label and one seed per image, and at least one image")
        self.outputs = [None] * len(self.labels)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def pending_images(self) -> int:
        """Images not yet handed to a batch."""
        return self.num_images - self.next_image

    def result(self) -> JobResult:
        return JobResult(images=list(self.outputs),
                         queue_time_s=(self.started_at or self.arrival) - self.arrival,
                         inference_time_s=self.inference_time_s,
                         batch_images=self.batch_images, batches=self.batches)


@dataclass(frozen=True)
class BatchSlice:
    job: Job
    start: int  # first image index inside the job
    count: int


@dataclass
class BatchPlan:
    slices: list[BatchSlice]
    id: int = field(default_factory=lambda: next(_plan_ids))

    @property
    def num_images(self) -> int:
        return sum(s.count for s in self.slices)

    def images(self) -> list[tuple[int, int, Any, frozenset[int], tuple[Job, int]]]:
        """Per image: (label, seed, params, preview scales, (job, index in the job))."""
        return [(s.job.labels[i], s.job.seeds[i], s.job.params,
                 s.job.preview_scales if s.job.on_preview is not None else frozenset(), (s.job, i))
                for s in self.slices for i in range(s.start, s.start + s.count)]
