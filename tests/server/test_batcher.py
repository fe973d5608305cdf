"""The batcher (server/batcher.py): admission, order, deadlines and results, with no model and no HTTP.

The inference worker is tested with the real demo engine in test_worker.py."""
from __future__ import annotations

import threading
import time

import pytest

from server import metrics
from server.batcher import Batcher, ClientGone
from server.errors import GenerationTimeout, OutOfMemory, Unavailable
from server.faults import FaultPlan
from server.jobs import JobStatus
from tests.fakes import WAIT_S, FakeClock, answer, complete, counter, make_batcher, make_job

# --- admission ------------------------------------------------------------------------------------

def test_queue_limit_is_counted_in_images_and_refusal_carries_retry_after():
    batcher = make_batcher(max_queue_images=5)
    first, refused_job, last = make_job(3), make_job(3), make_job(2)
    batcher.submit(first)
    with pytest.raises(Unavailable) as refused:
        batcher.submit(refused_job)
    assert refused.value.code == "queue_full" and refused.value.status == 503
    assert int(refused.value.headers()["Retry-After"]) >= 1
    batcher.submit(last)  # exactly fills the queue
    assert batcher.queued_images == 5
    # The error handlers count a refusal only for a job that was never admitted (tests/server/test_errors.py).
    assert (first.admitted, refused_job.admitted, last.admitted) == (True, False, True)


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
    complete(batcher, first, ["img"] * 3, seconds=0.1)
    assert not big.future.done()
    second = batcher.take_batch(3, timeout_s=0)
    assert [(s.job, s.start, s.count) for s in second.slices] == [(big, 3, 2), (small, 0, 1)]
    assert [(label, seed) for label, seed, *_ in second.images()] == [(3, 1003), (4, 1004), (50, 1000)]
    complete(batcher, second, ["a", "b", "c"], seconds=0.2)
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
    complete(batcher, plan, ["x", "y"], seconds=2.0)
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
    complete(batcher, plan, ["a", "b"], seconds=0.1)  # results of a cancelled job are dropped
    assert running.status == JobStatus.CANCELLED and batcher.is_idle()


def test_one_failed_image_fails_only_its_own_job():
    batcher = make_batcher()
    ok, bad = make_job(1, first_label=0), make_job(1, first_label=1)
    batcher.submit(ok)
    batcher.submit(bad)
    plan = batcher.take_batch(8, timeout_s=0)
    complete(batcher, plan, ["fine", OutOfMemory("oom")], seconds=0.1)
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


# --- fault holds (server/faults.py) ---------------------------------------------------------------

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


def test_take_batch_blocks_until_work_arrives():
    batcher = Batcher(max_queue_images=8, max_queue_delay_s=0)
    got = []
    taker = threading.Thread(target=lambda: got.append(batcher.take_batch(4, timeout_s=10)))
    taker.start()
    batcher.submit(make_job(1, arrival=time.monotonic()))
    taker.join(WAIT_S)
    assert not taker.is_alive(), f"take_batch still blocked {WAIT_S} s after work arrived"
    assert got and got[0] is not None and got[0].num_images == 1
