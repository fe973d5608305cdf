"""Admission accounts for every byte a call may hold (issue 25): online AMS-KV with a profile runs in the KV
manager's pool under a budget that its growth would exceed, and the KV peak that the allocator reports stays
within the budget.

The measurement is the allocator's, not our bookkeeping: torch.profiler's memory events (every allocation and
free with its address and size), of which those made inside the storage's ``KV_RANGE`` profiler range are K/V
(the pool, a cache's own buffers, growth). Their running sum is the live KV, and its maximum the KV peak.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from amskv.device import AllocatorTrace, allocator_trace
from amskv.engine import Engine, GenerationResult
from amskv.kvcache.manager import KVCacheManager
from amskv.kvcache.policy import make_policy
from amskv.kvcache.storage import KV_RANGE
from amskv.sampling import SamplingParams

PARAMS = SamplingParams(cfg=3.0, top_k=100, top_p=0.9)
LABELS, SEEDS = [3, 4], [0, 1]


@pytest.fixture(scope="module")
def planned(golden_engine) -> Engine:
    """Online AMS-KV whose profile plans layer 0's expansion only; theta 2.0 (above any cosine) makes every layer
    demanding, so layer 1 expands beyond the plan at its first overflow (scale 7) in every call."""
    var, vae = golden_engine.var, golden_engine.vae
    policy = make_policy("amskv", golden_engine.config.patch_nums, {"theta": 2.0}, profile=(True, False))
    return Engine(var, vae, policy, golden_engine.dtype, golden_engine.device)


def kv_timeline(trace: AllocatorTrace) -> list[int]:
    """Live K/V bytes after each allocator event: allocations inside ``KV_RANGE`` until their address is freed."""
    live: dict[int, int] = {}
    total, timeline = 0, []
    for event in trace.events:
        if event.nbytes > 0 and trace.in_range(KV_RANGE, event):
            live[event.address] = event.nbytes
            total += event.nbytes
        elif event.nbytes < 0:
            total -= live.pop(event.address, 0)  # a free of something else (activations) is not K/V
        timeline.append(total)
    return timeline


@dataclass
class Run:
    pool_bytes: int  # measured: the K/V live once warm-up (which allocates the pool) is over
    kv_peak: int  # measured: the most K/V live at once, over warm-up and two calls
    results: list[GenerationResult]
    manager: KVCacheManager


def run(engine: Engine, budget: int) -> Run:
    """Warm up a manager with a 2-image pool under ``budget`` bytes and run two whole-batch calls in it (two,
    so that a call's grown buffers still held during the next one would show)."""
    manager = KVCacheManager(engine, max_batch=2, cpu_budget_bytes=budget)
    with allocator_trace(engine.device) as warm:
        manager.warm_up(PARAMS)
    with allocator_trace(engine.device) as calls:  # the pool stays allocated: K/V of these calls adds to it
        results = [manager.generate(LABELS, SEEDS, [PARAMS] * 2) for _ in range(2)]
    warm_timeline, calls_timeline = kv_timeline(warm), kv_timeline(calls)
    pool_bytes = warm_timeline[-1]
    return Run(pool_bytes, max(max(warm_timeline), pool_bytes + max(calls_timeline, default=0)), results, manager)


@pytest.mark.slow
def test_growth_that_would_exceed_the_budget_is_refused_and_the_measured_kv_peak_stays_within_it(planned):
    # The growth one call needs, measured: with room for anything, layer 1 grows beyond the pool.
    free = run(planned, budget=2**40)
    assert free.pool_bytes == free.manager.pool.nbytes > 0  # the trace sees the pool the manager allocated
    growth = free.kv_peak - free.pool_bytes
    assert growth > 0 and all(r.unplanned_expansions == [1] for r in free.results)

    # One byte less than that growth beyond the pool: the growth would exceed the budget, so it is refused.
    budget = free.pool_bytes + growth - 1
    tight = run(planned, budget)
    assert tight.manager.pool_images == 2 and tight.pool_bytes == free.pool_bytes
    assert tight.kv_peak <= budget  # the allocator's KV peak, over warm-up and both calls
    assert tight.kv_peak == tight.pool_bytes  # nothing grew at all
    for result in tight.results:
        assert result.unplanned_expansions == [] and result.expansions == {0: 7}  # layer 1 kept at c_min
        assert result.kv_allocated_bytes == planned.memory(2).allocated_bytes  # the plan's bytes, nothing more
    state = tight.manager.state()
    assert state.refused_expansions == 2 and state.unplanned_expansions == 0  # counted: layer 1, once per call

    # Exactly that growth beyond the pool: the expansion fits (the reservation equals what the allocator sees),
    # and two calls in a row still peak within the budget (the first call's buffers are gone by the second).
    exact = run(planned, free.pool_bytes + growth)
    assert all(r.unplanned_expansions == [1] for r in exact.results)
    assert exact.kv_peak <= free.pool_bytes + growth
    assert exact.manager.state().refused_expansions == 0


@pytest.mark.slow
def test_a_refused_expansion_in_a_whole_batch_call_gives_the_images_of_the_slots_which_refuse_it_too(planned):
    from amskv.scheduler import ImageSpec, Scheduler

    no_room = run(planned, budget=2 * planned.kv_bytes_per_image())  # the pool and not a byte more
    whole = no_room.results[0]
    assert whole.unplanned_expansions == [] and no_room.manager.state().refused_expansions == 2

    manager = KVCacheManager(planned, max_batch=2, cpu_budget_bytes=2 * planned.kv_bytes_per_image())
    manager.warm_up(PARAMS)
    scheduler = Scheduler(planned, manager)
    specs = [ImageSpec(label, seed, PARAMS, frozenset(), i) for i, (label, seed) in enumerate(zip(LABELS, SEEDS))]
    scheduler.admit(specs)
    images: dict[int, torch.Tensor] = {}
    refused = 0
    while scheduler.cohorts:
        outcome = scheduler.step()
        refused += outcome.refused_expansions
        images.update((spec.tag, image) for spec, image in outcome.images)
    assert refused == 2  # the slots refuse layer 1 of each image (one image per cohort online)
    for i in range(2):  # the same decisions (every layer demanding, layer 1 refused), so the same pixels
        assert torch.equal(whole.images[i], images[i])
