"""The one inference thread: it loads the engine, warms it up, and then runs every batch.

Only this thread touches the model and the device, so the event loop keeps answering /metrics and
/livez while a batch runs. The loop is take -> execute -> complete: it asks the KV-cache manager
(amskv/kvcache/manager.py, which owns the budget, the KV pool and the OOM cap) how many images fit now,
takes a batch of at most that many from the batcher, runs it and hands the images back. An OOM splits
the failing call in halves (down to single images) and tells the manager, which lowers its cap.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from server import metrics
from server.batcher import Batcher
from server.errors import JobFailed, OutOfMemory, Unavailable
from server.jobs import BatchPlan, Job
from server.settings import Settings

logger = logging.getLogger(__name__)

WORKER_JOIN_S = 10.0  # shutdown waits this long for the running batch after the drain (docs/deploy.md)
IDLE_POLL_S = 0.25  # how often an idle loop re-reads the budget and checks for stop/faults


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    num_classes: int
    resolution: int
    channels: int
    policy: str
    dtype: str
    device: str
    kv_bytes_per_image: int
    vanilla_kv_bytes_per_image: int
    vocab_size: int | None
    kv_cache: dict[str, Any] = field(default_factory=dict)  # Engine.kv_cache_info(): policy and profile
    scales: tuple[int, ...] = ()  # patch_nums: side of each scale's token map (previews count them)


PreviewTarget = tuple[Job, int] | None  # (job, image index in the job) for a row that streams previews


def hand_previews(targets: Sequence[PreviewTarget], scale: int, rows: list[int], images: Any) -> None:
    """Give each streaming job its rows' preview images (on the inference thread; the job's sink is thread-safe)."""
    for row, image in zip(rows, images):
        job, index = targets[row]
        if job.status.is_finished():
            continue  # cancelled meanwhile
        try:
            job.on_preview(index, scale, image.numpy())
        except Exception:  # a preview must never fail the batch its image shares
            logger.exception("handing a preview of job %s to its stream failed", job.id)


class InjectedFault(RuntimeError):
    """Raised inside a batch by the test-only fault plan."""


class WorkerKilled(Exception):
    """Ends the inference thread on purpose (test-only fault)."""


class FatalWorkerError(Exception):
    """A state a restart fixes and this process cannot: a CUDA error, or K batches failing in a row."""


def is_cuda_error(exc: BaseException) -> bool:
    """A device error that leaves the CUDA context unusable (an OOM is not one: it is split and retried)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


class FaultPlan:
    """Test-only faults, set through POST /_test/faults when AMSKV_FAULT_INJECTION=1.

    Two of them let a test order events instead of racing a clock: ``hold_until_queued_images`` keeps
    the worker from taking a batch until that many images are queued (so requests sent one by one still
    share a batch), and ``batch_delay_ms`` is re-read while it sleeps, so a test can keep a batch
    running with a long delay and end it by setting the delay back to 0. Both are bounded in time, and
    stopping the worker ends them, so a forgotten fault cannot hang the server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._hold_deadline = 0.0
        self.fail_batches = 0  # the next N engine calls raise InjectedFault
        self.oom_calls = 0  # the next N engine calls with more than oom_above_images images raise OOM
        self.oom_above_images = 1
        self.batch_delay_ms = 0  # sleep before every engine call (a slow device); 0 ends a sleep early
        self.hold_until_queued_images = 0  # take no batch until N images are queued; then it resets to 0
        self.hold_timeout_ms = 30_000  # a hold set now ends after this long even if N never queue
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
        """True while the batcher must not form a batch; a hold ends (once) at its count or deadline."""
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

    def before_call(self, images: int) -> None:
        began = time.monotonic()
        while not self._stopped.is_set():  # re-read each step: setting the delay to 0 ends it
            left = self.batch_delay_ms / 1000 - (time.monotonic() - began)
            if left <= 0:
                break
            self._stopped.wait(min(left, 0.02))
        with self._lock:
            if self.fail_batches > 0:
                self.fail_batches -= 1
                raise InjectedFault("injected batch failure")
            if self.oom_calls > 0 and images > self.oom_above_images:
                self.oom_calls -= 1
                raise torch.OutOfMemoryError(f"injected out of memory for {images} images")


class InferenceWorker:
    def __init__(self, settings: Settings, batcher: Batcher, load_engine: Callable[[], Any], *,
                 dtype: str, faults: FaultPlan | None = None, warmup_params: Any = None) -> None:
        self.settings = settings
        self.batcher = batcher
        self.faults = faults
        self._load_engine = load_engine
        self._dtype = dtype
        self._warmup_params = warmup_params
        self._engine: Any = None
        self._thread = threading.Thread(target=self._main, name="amskv-inference", daemon=True)
        self._started = threading.Event()
        self._stop = threading.Event()
        self._startup_error: BaseException | None = None
        self._died = False
        self.death_reason: str | None = None  # why the thread ended; /livez and the exit watchdog report it
        self.heartbeat = time.monotonic()  # the loop's latest turn; it goes stale only while one batch runs
        self._consecutive_failures = 0
        self.manager: Any = None  # amskv.kvcache.manager.KVCacheManager, made on this thread after loading
        self.info: EngineInfo | None = None
        self.max_images = 0  # the cap used for the latest batch

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
        """Seconds the loop has been stuck in one turn (a batch running), 0 when idle or not started."""
        if self.info is None or self._died:
            return 0.0
        return max(0.0, time.monotonic() - self.heartbeat)

    @property
    def died(self) -> bool:
        return self._died

    # --- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            if self.settings.fault_injection and self.settings.fault_load_delay_s:
                self._stop.wait(self.settings.fault_load_delay_s)  # test-only slow start-up
                if self._stop.is_set():
                    raise RuntimeError("stopped before the engine loaded")
            self._engine = self._load_engine()
            self._warm_up()
        except BaseException as exc:  # reported to the lifespan, which stops start-up
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                if self.faults is not None and self.faults.kill_worker:
                    raise WorkerKilled("inference thread killed by fault injection")
                hold = self.faults.holds if self.faults is not None else None
                fits = self.admissible_batch()
                if fits < 1:  # no room now (the device is full): wait, the manager answers again
                    self._stop.wait(IDLE_POLL_S)
                    continue
                plan = self.batcher.take_batch(fits, timeout_s=IDLE_POLL_S, hold=hold)
                if plan is not None:
                    self._execute(plan)
        except BaseException as exc:
            logger.exception("the inference thread died; the server stops accepting work")
            self.death_reason = f"the inference worker died: {exc}"
            self._died = True
            metrics.READY.set(0)
            self.batcher.close(Unavailable("the inference worker died; the server needs a restart",
                                           code="worker_dead", retry_after_s=30))

    def _warm_up(self) -> None:
        from amskv.kvcache.manager import KVCacheManager  # the library owns the device and the budget

        engine = self._engine
        self.manager = KVCacheManager(engine, max_batch=self.settings.max_batch,
                                      cpu_budget_bytes=self.settings.cpu_kv_budget_bytes,
                                      gpu_mem_fraction=self.settings.gpu_mem_fraction,
                                      recover_after=self.settings.oom_recover_batches)
        self.manager.warm_up(self._warmup_params)
        kv_cache = engine.kv_cache_info() if hasattr(engine, "kv_cache_info") else {}
        self.info = EngineInfo(
            model_name=engine.model_name, num_classes=engine.num_classes, resolution=engine.resolution,
            channels=engine.channels, policy=engine.policy_name, dtype=self._dtype, device=str(engine.device),
            kv_bytes_per_image=engine.kv_bytes_per_image(),
            vanilla_kv_bytes_per_image=engine.vanilla_kv_bytes_per_image(),
            vocab_size=getattr(getattr(engine, "config", None), "vocab_size", None), kv_cache=kv_cache,
            scales=tuple(getattr(getattr(engine, "config", None), "patch_nums", ())))
        self.admissible_batch()
        metrics.start_scale_series(len(self.info.scales))
        metrics.KV_PER_IMAGE.labels(model=self.info.model_name).set(self.info.kv_bytes_per_image)
        metrics.KV_VANILLA_PER_IMAGE.labels(model=self.info.model_name).set(self.info.vanilla_kv_bytes_per_image)
        if self.info.vanilla_kv_bytes_per_image:
            metrics.KV_REDUCTION.set(1 - self.info.kv_bytes_per_image / self.info.vanilla_kv_bytes_per_image)
        if kv_cache:
            metrics.set_kv_profile(kv_cache["profile_source"], len(kv_cache["demanding_layers"]), kv_cache["theta"])
        state = self.manager.state()
        logger.info("model %s, policy %s, %s on %s: KV %.2f MiB per image (vanilla %.2f MiB); budget %.2f GiB; "
                    "KV pool %.2f MiB for %d images; activation reserve %.1f MiB; max batch %d images",
                    self.info.model_name, self.info.policy, self._dtype, engine.device,
                    self.info.kv_bytes_per_image / 2**20, self.info.vanilla_kv_bytes_per_image / 2**20,
                    state.budget_bytes / 2**30, state.reserved_bytes / 2**20, state.pool_images,
                    state.activation_reserve_bytes / 2**20, self.max_images)
        if kv_cache:
            logger.info("KV profile %s: theta %s, demanding layers %s", kv_cache["profile_source"],
                        kv_cache["theta"], kv_cache["demanding_layers"])

    def admissible_batch(self) -> int:
        """The manager's answer (0 = no room now), published with the rest of its state as metrics."""
        state = self.manager.state()
        self.max_images = state.admissible
        metrics.publish_kv_state(state)
        return state.admissible

    def _execute(self, plan: BatchPlan) -> None:
        count = plan.num_images
        metrics.BATCH_RUNNING.set(count)
        metrics.BATCH_SIZE.observe(count)
        began = time.perf_counter()
        fatal: str | None = None
        try:
            outputs = self._generate(plan.labels(), plan.seeds(), plan.params(), plan.preview_targets())
            self._consecutive_failures = 0
        except Exception as exc:
            logger.exception("batch %d (%d images) failed", plan.id, count)
            cuda = is_cuda_error(exc)
            metrics.BATCH_FAILURES.labels(reason="error").inc()
            self._consecutive_failures += 1
            if cuda:
                fatal = f"CUDA error (the device context is unusable): {exc}"
            elif self._consecutive_failures >= self.settings.max_consecutive_failures:
                fatal = f"{self._consecutive_failures} batches failed in a row"
            outputs = [JobFailed("image generation failed; the server log has details")] * count
        finally:
            # KV_USED and KV_USAGE_RATIO keep the last batch's values so a near-budget alert can see them.
            metrics.BATCH_RUNNING.set(0)
        self.batcher.complete(plan, outputs, time.perf_counter() - began)
        metrics.LAST_BATCH_COMPLETED.set(time.time())
        if fatal is not None:
            raise FatalWorkerError(fatal)

    def _generate(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[Any],
                  targets: Sequence[PreviewTarget]) -> list[Any]:
        """One output per image, in order: an image array, or OutOfMemory when even one image failed."""
        outputs: list[Any] = []
        start = 0
        while start < len(labels):
            stop = start + max(1, self.manager.cap)  # the cap can drop mid-plan after an OOM
            outputs += self._generate_chunk(labels[start:stop], seeds[start:stop], params[start:stop],
                                            targets[start:stop])
            start = stop
        return outputs

    def _generate_chunk(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[Any],
                        targets: Sequence[PreviewTarget]) -> list[Any]:
        count = len(labels)
        out_of_memory = False
        previews: dict[str, Any] = {}
        if any(targets):  # only rows whose clients stream ask the engine for previews
            previews = {"previews": [t[0].preview_scales if t else () for t in targets],
                        "on_preview": lambda scale, rows, images: hand_previews(targets, scale, rows, images)}
        try:
            if self.faults is not None:
                self.faults.before_call(count)
            if self.info is not None:  # the plan is exact: what this batch's cache will allocate
                metrics.KV_USED.set(self.info.kv_bytes_per_image * count)
            result = self.manager.generate(list(labels), list(seeds), list(params), **previews)
        except torch.OutOfMemoryError:
            out_of_memory = True  # retried outside the handler so the traceback's tensors are freed
        if out_of_memory:
            metrics.OOM.inc()
            cap = self.manager.note_oom(count)
            metrics.BATCH_MAX.set(cap)
            if count == 1:
                metrics.BATCH_FAILURES.labels(reason="oom").inc()
                logger.error("out of memory for a single image; failing it")
                return [OutOfMemory("out of device memory even for a single image")]
            half = (count + 1) // 2
            logger.warning("out of memory at %d images; retrying as %d + %d and capping batches at %d",
                           count, half, count - half, cap)
            return (self._generate_chunk(labels[:half], seeds[:half], params[:half], targets[:half])
                    + self._generate_chunk(labels[half:], seeds[half:], params[half:], targets[half:]))
        metrics.BATCH_DURATION.labels(stage="ar").observe(result.seconds_ar)
        metrics.BATCH_DURATION.labels(stage="decode").observe(result.seconds_decode)
        for scale, seconds in enumerate(result.scale_seconds):
            metrics.SCALE_DURATION.labels(scale=str(scale)).observe(seconds)
        metrics.KV_USED.set(result.kv_allocated_bytes)
        budget = self.manager.state().budget_bytes
        if budget:
            metrics.KV_USAGE_RATIO.set(min(1.0, result.kv_allocated_bytes / budget))
        if result.unplanned_expansions:
            metrics.KV_UNPLANNED_EXPANSIONS.inc(len(result.unplanned_expansions))
        images = result.images.cpu().numpy()  # (B, H, W, C) uint8
        return [images[i] for i in range(count)]
