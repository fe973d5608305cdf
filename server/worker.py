"""The one inference thread: it loads the engine, warms it up, and then runs every batch.

Only this thread touches the model and the device, so the event loop keeps answering /metrics and
/livez while a batch runs. Each loop turn reads the KV budget again, asks the engine how many images
fit, takes a batch from the batcher and hands the images back. An OOM splits the failing call in
halves (down to single images) and lowers the cap for later batches.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from server import metrics
from server.batcher import Batcher
from server.errors import JobFailed, OutOfMemory, Unavailable
from server.jobs import BatchPlan
from server.settings import MAX_BATCH_CEILING, Settings

logger = logging.getLogger(__name__)

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


class InjectedFault(RuntimeError):
    """Raised inside a batch by the test-only fault plan."""


class WorkerKilled(Exception):
    """Ends the inference thread on purpose (test-only fault)."""


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
        self._activation_peak = 0  # fixed part of the activation peak (cuda), bytes
        self._activation_per_image = 0  # per-image part of the activation peak (cuda), bytes
        self._oom_cap = MAX_BATCH_CEILING
        self._budget = 0
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

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self.faults is not None:
            self.faults.stop()
        self._thread.join(timeout_s)

    @property
    def ready(self) -> bool:
        return self.info is not None and self._thread.is_alive() and not self._died

    @property
    def died(self) -> bool:
        return self._died

    # --- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._engine = self._load_engine()
            self._warm_up()
        except BaseException as exc:  # reported to the lifespan, which stops start-up
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        try:
            while not self._stop.is_set():
                if self.faults is not None and self.faults.kill_worker:
                    raise WorkerKilled("inference thread killed by fault injection")
                hold = self.faults.holds if self.faults is not None else None
                plan = self.batcher.take_batch(self.admissible_batch(), timeout_s=IDLE_POLL_S, hold=hold)
                if plan is not None:
                    self._execute(plan)
        except BaseException:
            logger.exception("the inference thread died; the server stops accepting work")
            self._died = True
            metrics.READY.set(0)
            self.batcher.close(Unavailable("the inference worker died; the server needs a restart",
                                           code="worker_dead", retry_after_s=30))

    def _warm_up(self) -> None:
        engine = self._engine
        device = engine.device
        engine.generate([0], [0], [self._warmup_params])  # warm-up: first-call allocations and kernels
        if device.type == "cuda":
            # The activation peak grows with the batch: measure it at 1 and 2 images and extrapolate
            # linearly, so the admissible batch reserves activations as well as KV for every image.
            peak1 = self._measure_peak([0])
            peak2 = self._measure_peak([0, 1])
            self._activation_per_image = max(0, peak2 - peak1)
            self._activation_peak = max(0, peak1 - self._activation_per_image)
        self.info = EngineInfo(
            model_name=engine.model_name, num_classes=engine.num_classes, resolution=engine.resolution,
            channels=engine.channels, policy=engine.policy_name, dtype=self._dtype, device=str(device),
            kv_bytes_per_image=engine.kv_bytes_per_image(),
            vanilla_kv_bytes_per_image=engine.vanilla_kv_bytes_per_image(),
            vocab_size=getattr(getattr(engine, "config", None), "vocab_size", None))
        budget = self.budget_bytes()
        self.max_images = self.admissible_batch()
        if engine.max_batch(budget, cap=MAX_BATCH_CEILING) < 1:
            raise ValueError(
                f"the KV budget ({budget} bytes) holds no image ({self.info.kv_bytes_per_image} bytes "
                "each); raise AMSKV_KV_BUDGET_GIB or AMSKV_GPU_MEM_FRACTION")
        metrics.KV_PER_IMAGE.labels(model=self.info.model_name).set(self.info.kv_bytes_per_image)
        metrics.KV_VANILLA_PER_IMAGE.labels(model=self.info.model_name).set(self.info.vanilla_kv_bytes_per_image)
        if self.info.vanilla_kv_bytes_per_image:
            metrics.KV_REDUCTION.set(1 - self.info.kv_bytes_per_image / self.info.vanilla_kv_bytes_per_image)
        logger.info("model %s, policy %s, %s on %s: KV %.2f MiB per image (vanilla %.2f MiB); budget %.2f GiB; "
                    "activation peak %.1f MiB; max batch %d images",
                    self.info.model_name, self.info.policy, self._dtype, device,
                    self.info.kv_bytes_per_image / 2**20, self.info.vanilla_kv_bytes_per_image / 2**20,
                    budget / 2**30, self._activation_peak / 2**20, self.max_images)

    def _measure_peak(self, labels: list[int]) -> int:
        """Peak device bytes above the baseline for one batch, KV cache excluded."""
        device = self._engine.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = self._engine.generate(labels, labels, [self._warmup_params] * len(labels))
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - baseline - int(result.kv_allocated_bytes))

    def budget_bytes(self) -> int:
        """KV bytes available now: cuda reads free memory every time, cpu uses the configured budget."""
        device = self._engine.device
        if device.type != "cuda":
            return self.settings.cpu_kv_budget_bytes
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks our caching allocator holds but no tensor uses are ours to reuse, though not "free".
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return max(0, int((free + reusable) * self.settings.gpu_mem_fraction) - self._activation_peak)

    def admissible_batch(self) -> int:
        budget = self.budget_bytes()
        cap = min(MAX_BATCH_CEILING, self.settings.max_batch)
        if self._activation_per_image and self.info is not None:
            # each image needs its KV plus its share of the activations measured at warm-up
            by_memory = min(cap, budget // (self.info.kv_bytes_per_image + self._activation_per_image))
        else:
            by_memory = self._engine.max_batch(budget, cap=cap)
        # Never 0: a transiently full device still tries one image; the OOM path answers if it fails.
        self.max_images = max(1, min(by_memory, self._oom_cap))
        metrics.KV_BUDGET.set(budget)
        metrics.BATCH_MAX.set(self.max_images)
        self._budget = budget
        return self.max_images

    def _execute(self, plan: BatchPlan) -> None:
        count = plan.num_images
        metrics.BATCH_RUNNING.set(count)
        metrics.BATCH_SIZE.observe(count)
        began = time.perf_counter()
        try:
            outputs = self._generate(plan.labels(), plan.seeds(), plan.params())
        except Exception:
            logger.exception("batch %d (%d images) failed", plan.id, count)
            metrics.BATCH_FAILURES.labels(reason="error").inc()
            outputs = [JobFailed("image generation failed; the server log has details")] * count
        finally:
            metrics.BATCH_RUNNING.set(0)
            metrics.KV_USED.set(0)
            metrics.KV_USAGE_RATIO.set(0)
        self.batcher.complete(plan, outputs, time.perf_counter() - began)

    def _generate(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[Any]) -> list[Any]:
        """One output per image, in order: an image array, or OutOfMemory when even one image failed."""
        outputs: list[Any] = []
        start = 0
        while start < len(labels):
            stop = start + self._oom_cap  # the cap can drop mid-plan after an OOM
            outputs += self._generate_chunk(labels[start:stop], seeds[start:stop], params[start:stop])
            start = stop
        return outputs

    def _generate_chunk(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[Any]) -> list[Any]:
        count = len(labels)
        out_of_memory = False
        try:
            if self.faults is not None:
                self.faults.before_call(count)
            if self.info is not None:  # the plan is exact: what this batch's cache will allocate
                metrics.KV_USED.set(self.info.kv_bytes_per_image * count)
            result = self._engine.generate(list(labels), list(seeds), list(params))
        except torch.OutOfMemoryError:
            out_of_memory = True  # retried outside the handler so the traceback's tensors are freed
        if out_of_memory:
            metrics.OOM.inc()
            if self._engine.device.type == "cuda":
                torch.cuda.empty_cache()
            if count == 1:
                metrics.BATCH_FAILURES.labels(reason="oom").inc()
                logger.error("out of memory for a single image; failing it")
                return [OutOfMemory("out of device memory even for a single image")]
            half = (count + 1) // 2
            self._oom_cap = min(self._oom_cap, half)
            logger.warning("out of memory at %d images; retrying as %d + %d and capping batches at %d",
                           count, half, count - half, self._oom_cap)
            return (self._generate_chunk(labels[:half], seeds[:half], params[:half])
                    + self._generate_chunk(labels[half:], seeds[half:], params[half:]))
        metrics.BATCH_DURATION.labels(stage="ar").observe(result.seconds_ar)
        metrics.BATCH_DURATION.labels(stage="decode").observe(result.seconds_decode)
        metrics.KV_USED.set(result.kv_allocated_bytes)
        if self._budget:
            metrics.KV_USAGE_RATIO.set(min(1.0, result.kv_allocated_bytes / self._budget))
        images = result.images.cpu().numpy()  # (B, H, W, C) uint8
        return [images[i] for i in range(count)]
