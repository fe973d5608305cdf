"""The one inference thread: it loads the engine, warms it up, and then runs the scheduler step by step.

Only this thread touches the model and the device, so the event loop keeps answering /metrics and
/livez while images run. The loop is a scale-boundary turn: drop the images whose request is gone, admit
queued images into the free KV slots (``amskv.scheduler.Scheduler`` decides how many, the batcher which),
run one step (one scale for every running image), publish what it produced, repeat. Capacity, slots and
the OOM back-off live in the library (``amskv.kvcache.manager``, ``amskv.scheduler``); the metrics of a
step are recorded in one place (``server.metrics.record_step``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import torch

from amskv.engine import Engine, EngineInfo
from amskv.generate import TokenResult
from amskv.kvcache.manager import KVCacheManager
from amskv.sampling import SamplingParams
from amskv.scheduler import ImageSpec, Scheduler, StepEngine, StepOutcome
from server import metrics
from server.batcher import Batcher
from server.errors import JobFailed, OutOfMemory, Unavailable
from server.faults import FaultPlan, FaultyEngine, delayed_load, held
from server.jobs import Job
from server.settings import Settings

logger = logging.getLogger(__name__)

WORKER_JOIN_S = 10.0  # shutdown waits this long for the running step after the drain (docs/deploy.md)
IDLE_POLL_S = 0.25  # how often an idle loop re-reads the budget and checks for stop/faults


class FatalWorkerError(Exception):
    """A state a restart fixes and this process cannot: a CUDA error, or K steps failing in a row."""


def is_cuda_error(exc: BaseException) -> bool:
    """A device error that leaves the CUDA context unusable (an OOM is not one: it is retried smaller)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


JobImage = tuple[Job, int]  # a scheduled image's tag: its job and its index in the job


def job_of(spec: ImageSpec[JobImage]) -> Job:
    return spec.tag[0]


class InferenceWorker:
    def __init__(self, settings: Settings, batcher: Batcher, load_engine: Callable[[], Engine], *,
                 faults: FaultPlan | None = None, warmup_params: SamplingParams | None = None) -> None:
        self.settings = settings
        self.batcher = batcher
        self.faults = faults
        self._warmup_params = warmup_params or SamplingParams()
        # Fault injection is installed here, once, as wrappers (server/faults.py); the loop has one code path.
        self._load_engine = load_engine if faults is None else delayed_load(load_engine, faults,
                                                                             settings.fault_load_delay_s)
        self._take = batcher.take_batch if faults is None else held(batcher.take_batch, faults)
        self._thread = threading.Thread(target=self._main, name="amskv-inference", daemon=True)
        self._started = threading.Event()
        self._stop = threading.Event()
        self._startup_error: BaseException | None = None
        self._died = False
        self.death_reason: str | None = None  # why the thread ended; /livez and the exit watchdog report it
        self.heartbeat = time.monotonic()  # the loop's latest turn; it goes stale only while one step runs
        self._consecutive_failures = 0
        self.manager: KVCacheManager[TokenResult] | None = None  # made on this thread after loading
        self.scheduler: Scheduler[JobImage] | None = None
        self.info: EngineInfo | None = None
        self.max_images = 0  # the most images one step may run (the pool after OOM back-off)
        self.free_images = 0  # KV slots free at the latest boundary: images that could start now

    # --- lifecycle (called from the event loop) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wait_started(self, timeout_s: float | None = None) -> None:
        """Block until load + warm-up finished; re-raise their error."""
        if not self._started.wait(timeout_s):
            raise TimeoutError("the engine did not finish loading in time")
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout_s: float = WORKER_JOIN_S) -> None:
        self._stop.set()
        if self.faults is not None:
            self.faults.stop()
        self._thread.join(timeout_s)

    @property
    def ready(self) -> bool:
        return self.info is not None and self._thread.is_alive() and not self._died

    def stalled_s(self) -> float:
        """Seconds the loop has been stuck in one turn (a step running), 0 when idle or not started."""
        if self.info is None or self._died:
            return 0.0
        return max(0.0, time.monotonic() - self.heartbeat)

    @property
    def died(self) -> bool:
        return self._died

    # --- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            engine = self._load_engine()
            self._warm_up(engine)
        except BaseException as exc:  # reported to the lifespan, which stops start-up
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        scheduler, manager = self.scheduler, self.manager
        assert scheduler is not None and manager is not None  # _warm_up made them
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                self._turn(scheduler, manager)
        except BaseException as exc:
            logger.exception("the inference thread died; the server stops accepting work")
            self.death_reason = f"the inference worker died: {exc}"
            self._died = True
            metrics.READY.set(0)
            metrics.BATCH_RUNNING.set(0)  # the batcher fails every running image below
            self.batcher.close(Unavailable("the inference worker died; the server needs a restart",
                                           code="worker_dead", retry_after_s=30))

    def _warm_up(self, engine: Engine) -> None:
        manager = self.manager = KVCacheManager(engine, max_batch=self.settings.max_batch,
                                      cpu_budget_bytes=self.settings.cpu_kv_budget_bytes,
                                      gpu_mem_fraction=self.settings.gpu_mem_fraction,
                                      # the setting counts whole generations; the manager counts steps
                                      recover_after=self.settings.oom_recover_batches * engine.config.num_scales)
        manager.warm_up(self._warmup_params)
        stepper: StepEngine = engine if self.faults is None else FaultyEngine(engine, self.faults)
        scheduler = self.scheduler = Scheduler(stepper, manager, mode=self.settings.scheduler)
        info = engine.info()
        self._publish_room(scheduler, manager)
        metrics.start_model_info(info)
        state = manager.state()
        logger.info("model %s, policy %s, %s on %s: KV %.2f MiB per image (vanilla %.2f MiB); budget %.2f GiB; "
                    "KV pool %.2f MiB for %d images; activation reserve %.1f MiB; scheduler %s",
                    info.model_name, info.policy, info.dtype, info.device,
                    info.kv_bytes_per_image / 2**20, info.vanilla_kv_bytes_per_image / 2**20,
                    state.budget_bytes / 2**30, state.reserved_bytes / 2**20, state.pool_images,
                    state.activation_reserve_bytes / 2**20, self.settings.scheduler)
        logger.info("KV profile %s: theta %s, demanding layers %s", info.kv_cache.profile_source,
                    info.kv_cache.theta, list(info.kv_cache.demanding_layers))
        self.info = info  # last: ``ready`` turns true with it

    def _publish_room(self, scheduler: Scheduler[JobImage], manager: KVCacheManager[TokenResult]) -> int:
        """Images that may start now (0 = no room), published with the rest of the manager's state."""
        room, state = scheduler.room(), manager.state()
        self.max_images, self.free_images = state.admissible, room
        metrics.publish_kv_state(state, room)
        return room

    def _turn(self, scheduler: Scheduler[JobImage], manager: KVCacheManager[TokenResult]) -> None:
        """One scale boundary: drop, admit, step."""
        for job, count in Counter(job_of(s) for s in scheduler.drop(lambda s: job_of(s).status.is_finished())).items():
            self.batcher.dropped(job, count)
        running = scheduler.running_images
        room = self._publish_room(scheduler, manager)
        if room:
            plan = self._take(room, timeout_s=0 if running else IDLE_POLL_S, immediate=running > 0)
            if plan is not None:
                scheduler.admit([ImageSpec(label, seed, params, previews, tag)
                                 for label, seed, params, previews, tag in plan.images()])
        elif not running:
            self._stop.wait(IDLE_POLL_S)  # no room and nothing running: the device is full; ask again soon
            return
        metrics.BATCH_RUNNING.set(scheduler.running_images)  # before the step: a slow step shows what it runs
        if scheduler.running_images:
            self._publish(scheduler.step(), manager)
            metrics.BATCH_RUNNING.set(scheduler.running_images)

    def _publish(self, outcome: StepOutcome[JobImage], manager: KVCacheManager[TokenResult]) -> None:
        """Hand a step's previews, images and failures to their jobs, and record its metrics."""
        metrics.record_step(outcome, manager.state())
        self.batcher.note_step(Counter(job_of(s) for s in outcome.ran), outcome.rows, outcome.seconds)
        now = time.monotonic()
        for spec, scale, image in outcome.previews:
            job, index = spec.tag
            if job.status.is_finished() or job.on_preview is None:
                continue  # cancelled meanwhile
            if job.first_preview_at is None:
                job.first_preview_at = now
                metrics.FIRST_PREVIEW.observe(now - job.arrival)
            try:
                job.on_preview(index, scale, image.numpy())
            except Exception:  # a preview must never fail the images it shares a step with
                logger.exception("handing a preview of job %s to its stream failed", job.id)
        for spec, image in outcome.images:
            job, index = spec.tag
            self.batcher.deliver(job, index, image.numpy())
        metrics.LAST_BATCH_COMPLETED.set(time.time())  # the heartbeat: a step ended, whatever its outcome
        if outcome.failed:
            self._fail(outcome)
        elif not outcome.out_of_memory:
            self._consecutive_failures = 0

    def _fail(self, outcome: StepOutcome[JobImage]) -> None:
        exc = outcome.error
        if isinstance(exc, torch.OutOfMemoryError):
            error: Exception = OutOfMemory("out of device memory even for a single image")
        else:
            logger.error("a step of %d images failed", outcome.rows, exc_info=exc)
            error = JobFailed("image generation failed; the server log has details")
        for job, count in Counter(job_of(s) for s in outcome.failed).items():
            self.batcher.fail(job, count, error)
        if isinstance(exc, torch.OutOfMemoryError):
            return
        self._consecutive_failures += 1
        if exc is not None and is_cuda_error(exc):
            raise FatalWorkerError(f"CUDA error (the device context is unusable): {exc}")
        if self._consecutive_failures >= self.settings.max_consecutive_failures:
            raise FatalWorkerError(f"{self._consecutive_failures} batches failed in a row")
