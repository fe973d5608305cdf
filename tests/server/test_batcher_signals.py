"""The batcher's scrape-time signals: the age of the oldest queued request and the running request count."""
from __future__ import annotations

from tests.fakes import FakeClock, complete, make_batcher, make_job


def test_oldest_queued_age_follows_the_longest_waiting_request_and_running_counts_requests():
    clock = FakeClock()
    batcher = make_batcher(clock)
    assert batcher.oldest_queued_age_s() == 0.0 and batcher.running_requests == 0
    batcher.submit(make_job(2, arrival=100.0, first_label=0))
    batcher.submit(make_job(1, arrival=103.0, first_label=10))
    clock.now = 110.0
    assert batcher.oldest_queued_age_s() == 10.0
    plan = batcher.take_batch(2, timeout_s=0)  # the first request's two images run; the second waits
    assert plan is not None and plan.num_images == 2
    assert batcher.running_requests == 1
    assert batcher.oldest_queued_age_s() == 7.0
    complete(batcher, plan, [object(), object()], 0.1)
    assert batcher.running_requests == 0
