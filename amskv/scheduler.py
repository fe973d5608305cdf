"""Iteration-level scheduling at scale boundaries, in the manner of vLLM v1's scheduler.

The unit of work is one engine *step*: one scale for every running image (``amskv.step``). Between two steps
the caller drops cancelled images (``drop``), asks how many images may join (``room``) and admits them
(``admit``); ``step`` then runs every admitted image one scale further, the newcomers at scale 0 beside the
others at later scales, and hands back the images that finished, decoded, at once.

The KV manager (``amskv.kvcache.manager``) owns the slots: an image gets one at admission, under the
policy's plan at its peak, so an admitted image always completes and nothing is ever preempted; the slot
comes back when the image finishes, fails or is cancelled. "No room" is ``room() == 0``: the request waits.

``mode="static"`` admits only while no image runs: whole batches, the behaviour before this scheduler,
kept as the baseline. Out of memory (``torch.OutOfMemoryError``) restarts the step's images from scale 0
on the slots they hold (their caches may be half-written) and halves the images per step
(``KVCacheManager.note_oom``); a single image that runs out of memory fails.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from amskv.config import VARConfig
from amskv.kvcache.policy import AMSKVPolicy, KVPolicy
from amskv.kvcache.storage import KVPool
from amskv.sampling import SamplingParams
from amskv.step import Cohort, StepResult

logger = logging.getLogger(__name__)

SCHEDULER_MODES = ("continuous", "static")

Tag = TypeVar("Tag")  # the caller's handle of an image (the server's: its job and the image's index)


class StepEngine(Protocol):
    """What the scheduler needs of an engine: ``amskv.engine.Engine`` (``server.faults.FaultyEngine`` wraps one)."""

    @property
    def config(self) -> VARConfig: ...

    @property
    def policy(self) -> KVPolicy: ...

    def start_cohort(self, pool: KVPool, slot: int, labels: Sequence[int], seeds: Sequence[int],
                     params: Sequence[SamplingParams], tags: Sequence[Any],
                     previews: Sequence[Collection[int]] | None = None, order: int = 0) -> Cohort: ...

    def step(self, cohorts: Sequence[Cohort]) -> StepResult: ...


class SlotManager(Protocol):
    """What the scheduler needs of the KV manager (``amskv.kvcache.manager.KVCacheManager``): its slots."""

    @property
    def pool(self) -> KVPool | None: ...

    @property
    def cap(self) -> int: ...

    def free_images(self) -> int: ...

    def allocate(self, images: int) -> list[tuple[int, int]]: ...

    def release(self, first: int, count: int) -> None: ...

    def step_token_cap(self) -> int | None: ...

    def note_success(self) -> None: ...

    def note_oom(self, images: int) -> int: ...


@dataclass(frozen=True, eq=False)
class ImageSpec(Generic[Tag]):
    """One image to generate; ``tag`` is the caller's handle, given back with the image."""

    label: int
    seed: int
    params: SamplingParams
    previews: frozenset[int]
    tag: Tag


@dataclass
class StepOutcome(Generic[Tag]):
    """What one step did, as plain data: the caller publishes images and turns the stats into metrics."""

    ran: list[ImageSpec[Tag]] = field(default_factory=list)  # every image the step ran
    images: list[tuple[ImageSpec[Tag], torch.Tensor]] = field(default_factory=list)  # (spec, uint8 (H, W, C) CPU)
    previews: list[tuple[ImageSpec[Tag], int, torch.Tensor]] = field(default_factory=list)  # (spec, scale, image)
    failed: list[ImageSpec[Tag]] = field(default_factory=list)  # images this step's error ended (see ``error``)
    error: BaseException | None = None  # what failed the step (not an OOM that was retried)
    out_of_memory: bool = False  # the step ran out of memory; its images restart from scale 0
    rows: int = 0  # images the step ran
    tokens: int = 0  # sequence tokens the transformer ran (both CFG rows of every image)
    rows_per_scale: dict[int, int] = field(default_factory=dict)
    refused_expansions: int = 0  # online AMS-KV expansions the slots had no room for (layers kept at c_min)
    admitted: int = 0  # images admitted since the previous step
    cancelled: int = 0  # images dropped since the previous step
    seconds_ar: float = 0.0
    seconds_decode: float = 0.0
    seconds: float = 0.0  # wall time of the whole step


class Scheduler(Generic[Tag]):
    def __init__(self, engine: StepEngine, manager: SlotManager, *, mode: str = "continuous") -> None:
        if mode not in SCHEDULER_MODES:
            raise ValueError(f"scheduler mode must be one of {', '.join(SCHEDULER_MODES)}, got {mode!r}")
        self.engine, self.manager, self.mode = engine, manager, mode
        self.cohorts: list[Cohort] = []
        self._order = itertools.count()
        self._admitted = self._cancelled = 0
        policy = engine.policy
        # Online AMS-KV decides per layer from the keys of the rows it sees: one image per cohort makes that
        # the image's own keys, so its decisions (and image) do not depend on what it was admitted with.
        self.one_image_cohorts = isinstance(policy, AMSKVPolicy) and policy.demanding is None

    @property
    def running_images(self) -> int:
        return sum(c.n for c in self.cohorts)

    def room(self) -> int:
        """Images that may be admitted now: free KV slots; 0 in static mode while a batch runs."""
        if self.mode == "static" and self.cohorts:
            return 0
        return self.manager.free_images()

    def admit(self, images: Sequence[ImageSpec[Tag]]) -> int:
        """Start as many of ``images`` as there are free slots (in order); returns how many started."""
        runs = self.manager.allocate(len(images))
        order, started = next(self._order), 0
        for slot, count in runs:
            chunk = list(images[started:started + count])
            started += count
            pieces = [(slot + i, chunk[i:i + 1]) for i in range(count)] if self.one_image_cohorts else [(slot, chunk)]
            for first, specs in pieces:
                self.cohorts.append(self._start(first, specs, order))
        self._admitted += started
        return started

    def drop(self, is_cancelled: Callable[[ImageSpec[Tag]], bool]) -> list[ImageSpec[Tag]]:
        """Remove running images whose request is gone; their slots come back now. Returns them."""
        dropped: list[ImageSpec[Tag]] = []
        kept: list[Cohort] = []
        for c in self.cohorts:
            gone = [is_cancelled(spec) for spec in c.tags]
            if not any(gone):
                kept.append(c)
                continue
            dropped += [spec for spec, g in zip(c.tags, gone, strict=True) if g]
            start = 0
            for i in range(c.n + 1):  # keep each run of surviving images as a cohort of its own
                if i == c.n or gone[i]:
                    if i > start:
                        kept.append(c.split(start, i - start))
                    if i < c.n:
                        self.manager.release(c.slot + i, 1)
                    start = i + 1
        self.cohorts = kept
        self._cancelled += len(dropped)
        return dropped

    def step(self) -> StepOutcome[Tag]:
        """Run one scale for the running images: all of them, or the oldest that the OOM cap and the step's
        token budget allow."""
        chosen = self._choose(max(1, self.manager.cap), self.manager.step_token_cap())
        outcome: StepOutcome[Tag] = StepOutcome(admitted=self._admitted, cancelled=self._cancelled)
        self._admitted = self._cancelled = 0
        if not chosen:
            return outcome
        outcome.ran = [spec for c in chosen for spec in c.tags]
        outcome.rows = len(outcome.ran)
        began = time.perf_counter()
        out_of_memory = False
        try:
            result = self.engine.step(chosen)
        except torch.OutOfMemoryError:
            out_of_memory = True  # handled outside the except block, so the traceback's tensors are freed
        except Exception as exc:  # the step's images fail; the others (not in this step) go on
            for c in chosen:
                self._retire(c)
            outcome.failed = [spec for c in chosen for spec in c.tags]
            outcome.error = exc
            outcome.seconds = time.perf_counter() - began
            return outcome
        if out_of_memory:
            return self._after_oom(chosen, outcome, began)
        self.manager.note_success()
        outcome.tokens, outcome.rows_per_scale = result.tokens, result.rows_per_scale
        outcome.seconds_ar, outcome.seconds_decode = result.seconds_ar, result.seconds_decode
        outcome.previews = list(result.previews)
        outcome.refused_expansions = result.refused_expansions
        for c, images in result.finished:
            self._retire(c)
            outcome.images += list(zip(c.tags, images, strict=True))
        outcome.seconds = time.perf_counter() - began
        return outcome

    # --- internals ------------------------------------------------------------------------------
    def _start(self, slot: int, specs: list[ImageSpec[Tag]], order: int) -> Cohort:
        pool = self.manager.pool
        if pool is None:
            raise RuntimeError("the KV manager has no pool yet: warm it up before admitting images")
        return self.engine.start_cohort(pool, slot, [s.label for s in specs], [s.seed for s in specs],
                                        [s.params for s in specs], specs, [s.previews for s in specs], order)

    def _choose(self, cap: int, token_cap: int | None = None) -> list[Cohort]:
        """The oldest cohorts up to ``cap`` images and ``token_cap`` sequence tokens (the step's activations;
        None: unbounded); a cohort larger than what is left is split to fit. The oldest always runs."""
        chosen: list[Cohort] = []
        left, tokens_left = cap, token_cap
        for c in sorted(self.cohorts, key=lambda c: c.order):
            per_image = 2 * self.engine.config.scale_tokens[c.scale]
            fits = min(left, c.n if tokens_left is None else tokens_left // per_image)
            if not chosen:
                fits = max(fits, 1)  # progress: the oldest image runs even past the token budget
            if fits <= 0:
                break
            if c.n > fits:
                head, tail = c.split(0, fits), c.split(fits, c.n - fits)
                self.cohorts[self.cohorts.index(c):self.cohorts.index(c) + 1] = [head, tail]
                c = head
            chosen.append(c)
            left -= c.n
            if tokens_left is not None:
                tokens_left -= c.n * per_image
        return chosen

    def _retire(self, cohort: Cohort) -> None:
        self.cohorts.remove(cohort)
        self.manager.release(cohort.slot, cohort.n)

    def _after_oom(self, chosen: list[Cohort], outcome: StepOutcome[Tag], began: float) -> StepOutcome[Tag]:
        images = sum(c.n for c in chosen)
        cap = self.manager.note_oom(images)
        outcome.out_of_memory = True
        if images == 1:
            self._retire(chosen[0])
            outcome.failed = list(chosen[0].tags)
            outcome.error = torch.OutOfMemoryError("out of device memory even for a single image")
            logger.error("out of memory for a single image; failing it")
        else:
            logger.warning("out of memory at %d images in one step; restarting them from scale 0 and running "
                           "at most %d images per step", images, cap)
            for c in chosen:  # the caches may be half-written: start again on the same slots
                self.cohorts[self.cohorts.index(c)] = self._start(c.slot, list(c.tags), c.order)
        outcome.seconds = time.perf_counter() - began
        return outcome
