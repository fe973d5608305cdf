"""The inference worker (server/worker.py) with the real demo engine and scheduler, no HTTP.

Images are compared with the whole-batch sampler on each image alone (``Engine.generate``), the
independent reference; faults come from the one fault wrapper (server/faults.py).
"""
from __future__ import annotations

import time

import pytest
import torch

from amskv.engine import Engine
from amskv.sampling import SamplingParams
from server import metrics
from server.batcher import Batcher
from server.errors import JobFailed, OutOfMemory, Unavailable
from server.faults import FaultPlan
from server.jobs import Job, JobStatus
from server.settings import Settings
from server.worker import InferenceWorker
from tests.fakes import answer as batcher_answer, counter, wait_until as batcher_wait_until

WAIT_S = 60  # every wait is bounded: a deadlock fails the test instead of hanging it
PARAMS = SamplingParams(cfg=3.0, top_k=50, top_p=0.9)


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return Engine.load(model="demo")


def answer(job: Job, timeout_s: float = WAIT_S):
    return batcher_answer(job, timeout_s)


def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    batcher_wait_until(condition, what, timeout_s)


def start_worker(engine: Engine, *, budget_images: int = 8, faults: FaultPlan | None = None,
                 scheduler: str = "continuous", **settings):
    kv = engine.kv_bytes_per_image()
    settings = Settings(kv_budget_gib=budget_images * kv / 2**30, max_queue_images=512, scheduler=scheduler,
                        max_images_per_request=256, **settings)
    batcher = Batcher(max_queue_images=512, max_queue_delay_s=0.0)
    worker = InferenceWorker(settings, batcher, lambda: engine, faults=faults,
                             warmup_params=SamplingParams())
    worker.start()
    worker.wait_started(WAIT_S)
    return batcher, worker


def slow_worker(engine: Engine, delay_ms: int, **settings):
    """A worker whose every step waits ``delay_ms`` first (fault injection), so a test acts while images run."""
    faults = FaultPlan()
    faults.update(batch_delay_ms=delay_ms)
    return start_worker(engine, faults=faults, **settings)


def submit_running(batcher: Batcher, images: int, seed: int) -> Job:
    """Submit a request and wait until its images run."""
    job = submit(batcher, images, seed=seed)
    wait_until(lambda: job.status == JobStatus.RUNNING, "the request to start")
    return job


def submit(batcher: Batcher, images: int, first_label: int = 0, seed: int = 100, previews=()) -> Job:
    now = time.monotonic()
    job = Job(id=f"job{first_label}-{seed}", labels=[(first_label + i) % 10 for i in range(images)],
              seeds=[seed + i for i in range(images)], params=PARAMS, priority=1, arrival=now, deadline=now + 300,
              preview_scales=frozenset(previews))
    if previews:
        job.on_preview = lambda index, scale, image: job.outputs  # noqa: B023 - only its call time matters
    batcher.submit(job)
    return job


def reference(engine: Engine, job: Job) -> list[torch.Tensor]:
    return [engine.generate([lab], [seed], [PARAMS]).images[0] for lab, seed in zip(job.labels, job.seeds)]


def same_images(result, expected) -> bool:
    return len(result.images) == len(expected) and all(
        torch.equal(torch.from_numpy(got), want) for got, want in zip(result.images, expected))


def test_admission_is_capped_by_the_kv_slots_and_every_image_comes_back(demo):
    batcher, worker = start_worker(demo, budget_images=4)
    try:
        assert worker.manager.pool_images == 4 and worker.ready
        job = submit(batcher, 10)
        result = answer(job)
        assert same_images(result, reference(demo, job))
        assert result.batches == 3 and result.batch_images == 4  # admitted 4 + 4 + 2 as slots freed
        assert worker.manager.free_images() == 4
    finally:
        worker.stop()


def test_a_request_joins_a_running_one_at_the_next_scale_boundary(demo):
    batcher, worker = slow_worker(demo, 30, budget_images=16)  # slow steps: the second arrives while the first runs
    try:
        first = submit_running(batcher, 8, seed=1)
        second = submit(batcher, 1, first_label=5, seed=2)
        wait_until(lambda: second.status == JobStatus.RUNNING, "the second request to join")
        assert not first.future.done(), "the second request started only after the first ended"
        assert same_images(answer(second), reference(demo, second))
        assert same_images(answer(first), reference(demo, first))
    finally:
        worker.stop()


def test_static_scheduler_starts_a_request_only_when_nothing_runs(demo):
    batcher, worker = slow_worker(demo, 30, budget_images=16, scheduler="static")
    try:
        first = submit_running(batcher, 4, seed=1)
        second = submit(batcher, 1, first_label=5, seed=2)
        time.sleep(0.1)  # several boundaries pass
        assert second.status == JobStatus.QUEUED
        answer(first)
        assert same_images(answer(second), reference(demo, second))
    finally:
        worker.stop()


def test_a_cancelled_request_leaves_at_the_next_boundary_and_frees_its_slots(demo):
    batcher, worker = slow_worker(demo, 50, budget_images=64)
    cancelled = counter(metrics.IMAGES_CANCELLED)
    try:
        big = submit(batcher, 64, seed=3)
        wait_until(lambda: worker.manager.free_images() == 0, "the 64 images to hold every slot")
        batcher.cancel(big)
        wait_until(lambda: worker.manager.free_images() == 64, "the cancelled images' slots to come back", 5)
        worker.faults.update(batch_delay_ms=0)
        small = submit(batcher, 1, seed=4)
        assert same_images(answer(small), reference(demo, small))
        assert counter(metrics.IMAGES_CANCELLED) == cancelled + 64
        wait_until(batcher.is_idle, "the batcher to see no running image")
    finally:
        worker.stop()


def test_out_of_memory_restarts_with_fewer_images_per_step_and_every_request_succeeds(demo):
    faults = FaultPlan()
    faults.update(hold_until_queued_images=8)  # all four jobs start together
    batcher, worker = start_worker(demo, budget_images=8, faults=faults, oom_recover_batches=1000)
    ooms = counter(metrics.OOM)
    try:
        faults.update(oom_calls=2, oom_above_images=2)
        jobs = [submit(batcher, 2, first_label=3 * k, seed=10 * k) for k in range(4)]
        for job in jobs:
            assert same_images(answer(job), reference(demo, job))
        assert counter(metrics.OOM) == ooms + 2  # 8 -> restart at <= 4 -> restart at <= 2
        assert worker.manager.cap <= 2
    finally:
        worker.stop()


@pytest.mark.parametrize(("fault", "error", "images"), [
    ({"oom_calls": 1, "oom_above_images": 0}, OutOfMemory, 1),  # out of memory even for a single image
    ({"fail_batches": 1}, JobFailed, 2),  # an error in the step
])
def test_a_failing_step_fails_only_its_own_request_and_the_worker_goes_on(demo, fault, error, images):
    faults = FaultPlan()
    batcher, worker = start_worker(demo, faults=faults)
    try:
        faults.update(**fault)
        with pytest.raises(error):
            answer(submit(batcher, images))
        assert worker.ready  # neither is fatal
        assert len(answer(submit(batcher, images)).images) == images
    finally:
        worker.stop()


def test_consecutive_failures_end_the_worker(demo):
    faults = FaultPlan()
    batcher, worker = start_worker(demo, faults=faults, max_consecutive_failures=2)
    try:
        faults.update(fail_batches=2)
        for _ in range(2):
            with pytest.raises((JobFailed, Unavailable)):
                answer(submit(batcher, 1))
        wait_until(lambda: worker.died, "the worker to die after 2 failed steps")
        assert "2 batches failed in a row" in worker.death_reason
    finally:
        worker.stop()


def test_killed_worker_fails_running_and_queued_work_and_refuses_new_work(demo):
    faults = FaultPlan()
    faults.update(batch_delay_ms=60_000)  # the first step waits until the test lets it go
    batcher, worker = start_worker(demo, faults=faults)
    try:
        running = submit(batcher, 1)
        wait_until(lambda: running.status == JobStatus.RUNNING, "the first job to start")
        faults.update(kill_worker=True)
        faults.update(batch_delay_ms=0)  # the next step ends the thread
        for job in (running,):
            with pytest.raises(Unavailable):
                answer(job)
        worker._thread.join(WAIT_S)
        assert worker.died and not worker.ready
        with pytest.raises(Unavailable) as refused:
            submit(batcher, 1)
        assert refused.value.code == "worker_dead"
    finally:
        worker.stop()


def test_time_to_first_preview_is_recorded_once_per_request(demo):
    batcher, worker = start_worker(demo)
    before = metrics.FIRST_PREVIEW._sum.get(), counter_count(metrics.FIRST_PREVIEW)
    try:
        job = submit(batcher, 2, previews=(0, 3))
        answer(job)
        assert counter_count(metrics.FIRST_PREVIEW) == before[1] + 1
        assert job.first_preview_at is not None and job.first_preview_at >= job.arrival
    finally:
        worker.stop()


def counter_count(histogram) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))


def test_budget_too_small_for_one_image_stops_start_up(demo):
    worker = InferenceWorker(Settings(kv_budget_gib=1 / 2**30), Batcher(max_queue_images=8, max_queue_delay_s=0),
                             lambda: demo, warmup_params=SamplingParams())
    worker.start()
    with pytest.raises(ValueError, match="holds no image"):
        worker.wait_started(WAIT_S)
