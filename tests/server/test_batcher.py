"""Batcher and inference-worker logic against a fake engine (no model, no HTTP)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import pytest
import torch

from server import metrics
from server.batcher import Batcher, ClientGone
from server.errors import GenerationTimeout, JobFailed, OutOfMemory, Unavailable
from server.jobs import Job, JobStatus
from server.settings import Settings
from server.worker import FaultPlan, InferenceWorker

KV_PER_IMAGE = 1000
WAIT_S = 10  # every wait in this module is bounded: a deadlock fails the test instead of hanging it


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_job(images: int = 1, *, priority: int = 1, arrival: float = 100.0, timeout_s: float = 60.0,
             first_label: int = 0) -> Job:
    return Job(id=f"job{first_label}", labels=[first_label + i for i in range(images)],
               seeds=[1000 + i for i in range(images)], params=None, priority=priority,
               arrival=arrival, deadline=arrival + timeout_s)


def make_batcher(clock=None, *, max_queue_images: int = 64, delay_s: float = 0.0) -> Batcher:
    return Batcher(max_queue_images=max_queue_images, max_queue_delay_s=delay_s, clock=clock or FakeClock())


def counter(metric, **labels) -> float:
    return (metric.labels(**labels) if labels else metric)._value.get()


def answer(job: Job, timeout_s: float = WAIT_S):
    """The job's result (or its exception), failing the test if nothing answers it within timeout_s."""
    try:
        return job.future.result(timeout=timeout_s)
    except FutureTimeout:
        pytest.fail(f"job {job.id} ({job.status.name}) got no answer within {timeout_s} s: batcher or worker stuck")


def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


# --- admission ------------------------------------------------------------------------------------

def test_queue_limit_is_counted_in_images_and_refusal_carries_retry_after():
    batcher = make_batcher(max_queue_images=5)
    batcher.submit(make_job(3))
    before = counter(metrics.REJECTED, reason="queue_full")
    with pytest.raises(Unavailable) as refused:
        batcher.submit(make_job(3))
    assert refused.value.code == "queue_full" and refused.value.status == 503
    assert int(refused.value.headers()["Retry-After"]) >= 1
    assert counter(metrics.REJECTED, reason="queue_full") == before + 1
    batcher.submit(make_job(2))  # exactly fills the queue
    assert batcher.queued_images == 5


def test_draining_refuses_new_jobs_but_runs_queued_ones_without_waiting_for_the_delay():
    batcher = make_batcher(delay_s=3600)
    job = make_job(2)
    batcher.submit(job)
    batcher.start_draining()
    with pytest.raises(Unavailable) as refused:
        batcher.submit(make_job(1))
    assert refused.value.code == "draining"
    plan = batcher.take_batch(8, timeout_s=0)
    assert plan is not None and plan.num_images == 2


# --- batch formation ------------------------------------------------------------------------------

def test_waits_for_the_queue_delay_unless_the_batch_is_full():
    clock = FakeClock()
    batcher = make_batcher(clock, delay_s=0.010)
    batcher.submit(make_job(2, arrival=clock.now))
    assert batcher.take_batch(4, timeout_s=0) is None  # not full, too young
    batcher.submit(make_job(2, arrival=clock.now, first_label=10))
    plan = batcher.take_batch(4, timeout_s=0)  # full now
    assert plan is not None and plan.num_images == 4 and len(plan.slices) == 2
    batcher.submit(make_job(1, arrival=clock.now))
    clock.now += 0.011
    plan = batcher.take_batch(4, timeout_s=0)
    assert plan is not None and plan.num_images == 1


def test_priority_first_then_arrival_order():
    batcher = make_batcher()
    late_urgent = make_job(1, priority=0, first_label=30)
    first, second = make_job(1, first_label=10), make_job(1, first_label=20)
    batcher.submit(first)
    batcher.submit(second)
    batcher.submit(late_urgent)
    plan = batcher.take_batch(2, timeout_s=0)
    assert [s.job for s in plan.slices] == [late_urgent, first]


def test_large_job_is_split_and_its_remainder_is_not_overtaken():
    batcher = make_batcher()
    big, small = make_job(5, first_label=0), make_job(1, first_label=50)
    batcher.submit(big)
    batcher.submit(small)
    splits = counter(metrics.BATCH_SPLITS)
    first = batcher.take_batch(3, timeout_s=0)
    assert [(s.job, s.start, s.count) for s in first.slices] == [(big, 0, 3)]
    assert counter(metrics.BATCH_SPLITS) == splits + 1
    batcher.complete(first, ["img"] * 3, seconds=0.1)
    assert not big.future.done()
    second = batcher.take_batch(3, timeout_s=0)
    assert [(s.job, s.start, s.count) for s in second.slices] == [(big, 3, 2), (small, 0, 1)]
    assert second.labels() == [3, 4, 50] and second.seeds() == [1003, 1004, 1000]
    batcher.complete(second, ["a", "b", "c"], seconds=0.2)
    result = answer(big)
    assert result.images == ["img", "img", "img", "a", "b"]
    assert result.batches == 2 and result.batch_images == 3
    assert answer(small).images == ["c"]
    assert batcher.is_idle()


# --- deadlines, cancellation, failures -------------------------------------------------------------

def test_expired_job_fails_with_queue_timeout_and_is_never_started():
    clock = FakeClock()
    batcher = make_batcher(clock)
    doomed = make_job(1, timeout_s=1.0)
    batcher.submit(doomed)
    clock.now += 2.0
    assert batcher.take_batch(4, timeout_s=0) is None
    with pytest.raises(Unavailable) as err:
        answer(doomed)
    assert err.value.code == "queue_timeout"
    assert doomed.status == JobStatus.EXPIRED and batcher.queued_images == 0


def test_split_job_whose_deadline_passes_between_batches_times_out():
    clock = FakeClock()
    batcher = make_batcher(clock)
    job = make_job(4, timeout_s=1.0)
    batcher.submit(job)
    plan = batcher.take_batch(2, timeout_s=0)
    clock.now += 2.0
    batcher.complete(plan, ["x", "y"], seconds=2.0)
    assert batcher.take_batch(2, timeout_s=0) is None
    with pytest.raises(GenerationTimeout):
        answer(job)


def test_cancel_removes_a_queued_job_and_discards_a_running_one():
    batcher = make_batcher()
    queued = make_job(2)
    batcher.submit(queued)
    cancelled_before = counter(metrics.CANCELLED, stage="queued")
    batcher.cancel(queued)
    assert batcher.queued_images == 0 and queued.status == JobStatus.CANCELLED
    assert counter(metrics.CANCELLED, stage="queued") == cancelled_before + 1
    with pytest.raises(ClientGone):
        answer(queued)

    running = make_job(2, first_label=5)
    batcher.submit(running)
    plan = batcher.take_batch(8, timeout_s=0)
    batcher.cancel(running)
    batcher.complete(plan, ["a", "b"], seconds=0.1)  # results of a cancelled job are dropped
    assert running.status == JobStatus.CANCELLED and batcher.is_idle()


def test_one_failed_image_fails_only_its_own_job():
    batcher = make_batcher()
    ok, bad = make_job(1, first_label=0), make_job(1, first_label=1)
    batcher.submit(ok)
    batcher.submit(bad)
    plan = batcher.take_batch(8, timeout_s=0)
    batcher.complete(plan, ["fine", OutOfMemory("oom")], seconds=0.1)
    assert answer(ok).images == ["fine"]
    with pytest.raises(OutOfMemory):
        answer(bad)


def test_close_fails_queued_and_running_jobs_and_refuses_new_ones():
    batcher = make_batcher()
    running, queued = make_job(2), make_job(2, first_label=9)
    batcher.submit(running)
    batcher.submit(queued)
    batcher.take_batch(2, timeout_s=0)
    batcher.close(Unavailable("gone", code="worker_dead"))
    for job in (running, queued):
        with pytest.raises(Unavailable):
            answer(job)
    with pytest.raises(Unavailable) as refused:
        batcher.submit(make_job(1))
    assert refused.value.code == "worker_dead"


# --- the worker against a fake engine --------------------------------------------------------------

@dataclass
class FakeResult:
    images: torch.Tensor
    kv_allocated_bytes: int
    seconds_ar: float = 0.01
    seconds_decode: float = 0.01
    unplanned_expansions: tuple = ()
    scale_seconds: tuple = (0.004, 0.006)


@dataclass
class FakePool:
    images: int

    @property
    def nbytes(self) -> int:
        return self.images * KV_PER_IMAGE


class FakeEngine:
    """Image i is filled with labels[i] + seeds[i]; batch sizes seen are recorded."""

    model_name, num_classes, resolution, channels, policy_name = "fake", 10, 2, 1, "amskv"
    device = torch.device("cpu")

    def __init__(self, oom_above: int | None = None) -> None:
        self.calls: list[int] = []
        self.oom_above = oom_above

    def kv_bytes_per_image(self) -> int:
        return KV_PER_IMAGE

    def vanilla_kv_bytes_per_image(self) -> int:
        return 2 * KV_PER_IMAGE

    def max_batch(self, budget_bytes: int, cap: int = 256) -> int:
        return min(cap, budget_bytes // KV_PER_IMAGE)

    def new_pool(self, images: int) -> FakePool:
        return FakePool(images)

    def generate(self, labels, seeds, params, pool: FakePool | None = None) -> FakeResult:
        if pool is not None and len(labels) > pool.images:
            raise ValueError(f"{len(labels)} images exceed the pool of {pool.images}")
        self.calls.append(len(labels))
        if self.oom_above is not None and len(labels) > self.oom_above:
            raise torch.OutOfMemoryError("fake OOM")
        values = torch.tensor([(lab + seed) % 256 for lab, seed in zip(labels, seeds)], dtype=torch.uint8)
        images = values.view(-1, 1, 1, 1).expand(-1, 2, 2, 1).contiguous()  # (B, H, W, C)
        return FakeResult(images, kv_allocated_bytes=KV_PER_IMAGE * len(labels))


def start_worker(engine: FakeEngine, *, budget_images: int = 8, faults: FaultPlan | None = None,
                 delay_s: float = 0.0):
    settings = Settings(kv_budget_gib=budget_images * KV_PER_IMAGE / 2**30, max_queue_images=256)
    batcher = Batcher(max_queue_images=256, max_queue_delay_s=delay_s)
    worker = InferenceWorker(settings, batcher, lambda: engine, dtype="fp32", faults=faults)
    worker.start()
    worker.wait_started(WAIT_S)
    return batcher, worker


def submit_now(batcher: Batcher, images: int, first_label: int = 0) -> Job:
    job = make_job(images, arrival=time.monotonic(), first_label=first_label)
    batcher.submit(job)
    return job


def test_worker_caps_batches_by_the_kv_budget_and_returns_each_image():
    engine = FakeEngine()
    batcher, worker = start_worker(engine, budget_images=4)
    try:
        assert worker.max_images == 4 and worker.ready
        job = submit_now(batcher, 10)
        result = answer(job)
        assert [int(img[0, 0, 0]) for img in result.images] == [(i + 1000 + i) % 256 for i in range(10)]
        assert max(engine.calls[1:]) <= 4  # calls[0] is the warm-up
        assert result.batches == 3
    finally:
        worker.stop()


def test_oom_splits_the_batch_lowers_the_cap_and_every_request_still_succeeds():
    engine, faults = FakeEngine(oom_above=2), FaultPlan()
    faults.update(hold_until_queued_images=8)  # all four jobs queue before the worker takes a batch
    batcher, worker = start_worker(engine, budget_images=8, faults=faults)
    ooms = counter(metrics.OOM)
    try:
        jobs = [submit_now(batcher, 2, first_label=10 * k) for k in range(4)]
        for k, job in enumerate(jobs):
            values = [int(img[0, 0, 0]) for img in answer(job).images]
            assert values == [(10 * k + i + 1000 + i) % 256 for i in range(2)]
        # one batch of 8 (calls[0] is the warm-up): 8 -> OOM, 4 -> OOM, 2 + 2, then 4 -> OOM, 2 + 2
        assert engine.calls[1:] == [8, 4, 2, 2, 4, 2, 2]
        assert counter(metrics.OOM) == ooms + 3
        assert worker.max_images <= 2
    finally:
        worker.stop()


def test_oom_of_a_single_image_fails_only_that_request():
    faults = FaultPlan()
    batcher, worker = start_worker(FakeEngine(), budget_images=8, faults=faults)
    try:
        faults.update(oom_calls=1, oom_above_images=0)
        with pytest.raises(OutOfMemory):
            answer(submit_now(batcher, 1))
        assert worker.ready  # an OOM is not fatal
        assert len(answer(submit_now(batcher, 1)).images) == 1
    finally:
        worker.stop()


def test_injected_batch_error_fails_that_batch_only_and_later_batches_succeed():
    faults = FaultPlan()
    batcher, worker = start_worker(FakeEngine(), faults=faults)
    try:
        faults.update(fail_batches=1)
        with pytest.raises(JobFailed):
            answer(submit_now(batcher, 2))
        assert len(answer(submit_now(batcher, 2)).images) == 2
    finally:
        worker.stop()


def test_killed_worker_fails_queued_work_fast_and_refuses_new_work():
    faults = FaultPlan()
    faults.update(batch_delay_ms=60_000)  # the first batch runs until the test ends the delay
    batcher, worker = start_worker(FakeEngine(), faults=faults)
    try:
        running = submit_now(batcher, 1)
        wait_until(lambda: running.status == JobStatus.RUNNING, "the worker to take the first job alone")
        faults.update(kill_worker=True)
        queued = submit_now(batcher, 1)  # queued behind the running batch
        assert queued.status == JobStatus.QUEUED
        faults.update(batch_delay_ms=0)  # the batch in flight finishes, then the thread dies
        with pytest.raises(Unavailable):
            answer(queued)
        assert len(answer(running).images) == 1
        worker._thread.join(WAIT_S)
        assert not worker._thread.is_alive(), "the killed inference thread did not end"
        assert worker.died and not worker.ready
        with pytest.raises(Unavailable) as refused:
            submit_now(batcher, 1)
        assert refused.value.code == "worker_dead"
    finally:
        worker.stop()


def test_hold_keeps_the_queue_until_enough_images_are_queued_even_past_the_delay():
    clock, faults = FakeClock(), FaultPlan()
    batcher = make_batcher(clock, delay_s=0.010)
    faults.update(hold_until_queued_images=3)
    batcher.submit(make_job(2, arrival=clock.now))
    clock.now += 1.0  # far past the queue delay
    assert batcher.take_batch(8, timeout_s=0, hold=faults.holds) is None
    batcher.submit(make_job(1, arrival=clock.now, first_label=5))
    plan = batcher.take_batch(8, timeout_s=0, hold=faults.holds)
    assert plan is not None and plan.num_images == 3
    assert faults.hold_until_queued_images == 0  # a hold ends once it is met


def test_hold_ends_at_its_timeout_and_when_the_plan_stops():
    faults = FaultPlan()
    faults.update(hold_timeout_ms=0, hold_until_queued_images=5)
    assert not faults.holds(1) and faults.hold_until_queued_images == 0
    faults.update(hold_timeout_ms=60_000, hold_until_queued_images=5)
    assert faults.holds(1)
    faults.stop()
    assert not faults.holds(1)


def test_budget_too_small_for_one_image_stops_start_up():
    settings = Settings(kv_budget_gib=1 / 2**30)  # 1 byte
    worker = InferenceWorker(settings, make_batcher(), lambda: FakeEngine(), dtype="fp32")
    worker.start()
    with pytest.raises(ValueError, match="holds no image"):
        worker.wait_started(WAIT_S)


def test_take_batch_blocks_until_work_arrives():
    batcher = Batcher(max_queue_images=8, max_queue_delay_s=0)
    got = []
    taker = threading.Thread(target=lambda: got.append(batcher.take_batch(4, timeout_s=10)))
    taker.start()
    batcher.submit(make_job(1, arrival=time.monotonic()))
    taker.join(WAIT_S)
    assert not taker.is_alive(), f"take_batch still blocked {WAIT_S} s after work arrived"
    assert got and got[0] is not None and got[0].num_images == 1
