"""The KV-cache manager on the real golden engine: one pool reused, admission by budget, OOM cap recovery,
and online AMS-KV expansions beyond a profile allocated as exceptions."""
import math

import pytest
import torch

from amskv.engine import Engine
from amskv.kvcache.manager import KVCacheManager
from amskv.kvcache.policy import make_policy
from amskv.sampling import SamplingParams

PARAMS = SamplingParams(cfg=3.0, top_k=100, top_p=0.9)


@pytest.fixture(scope="module")
def static_engine(golden_engine):
    return golden_engine.with_policy("amskv-static", {"demanding": "01"})


def manager_for(engine, images_in_budget: float, **kwargs) -> KVCacheManager:
    manager = KVCacheManager(engine, cpu_budget_bytes=int(images_in_budget * engine.kv_bytes_per_image()), **kwargs)
    manager.warm_up(PARAMS)
    return manager


def pool_pointers(manager):
    return [t.data_ptr() for t in manager.pool.k + manager.pool.v]


def test_no_room_before_warm_up_and_a_budget_below_one_image_refuses_to_start(static_engine):
    assert KVCacheManager(static_engine).admissible() == 0
    with pytest.raises(ValueError, match="holds no image"):
        manager_for(static_engine, 0.9)


def test_a_binding_budget_bounds_every_executed_batch(static_engine):
    manager = manager_for(static_engine, 3.5)
    per_image, budget = static_engine.kv_bytes_per_image(), manager.state().budget_bytes
    assert manager.admissible() == manager.pool_images == 3
    assert manager.state().reserved_bytes == 3 * per_image <= budget
    labels = list(range(7))
    done, sizes = 0, []
    while done < len(labels):
        n = min(manager.admissible(), len(labels) - done)
        result = manager.generate(labels[done:done + n], labels[done:done + n], [PARAMS] * n)
        assert result.kv_allocated_bytes == n * per_image <= budget  # the real engine's bytes, not a model
        sizes.append(n)
        done += n
    assert sizes == [3, 3, 1]
    with pytest.raises(ValueError, match="exceed the KV pool"):
        manager.generate(labels[:4], labels[:4], [PARAMS] * 4)


def test_the_pool_is_allocated_once_and_reused_with_identical_images(static_engine):
    manager = manager_for(static_engine, 4)
    before, held = pool_pointers(manager), manager.state().reserved_bytes
    first = manager.generate([5, 6], [1, 2], [PARAMS] * 2)
    second = manager.generate([7, 8, 9, 10], [3, 4, 5, 6], [PARAMS] * 4)
    assert pool_pointers(manager) == before and manager.state().reserved_bytes == held
    assert manager.state().used_bytes == 0  # idle again
    fresh = static_engine.generate([5, 6], [1, 2], [PARAMS] * 2)  # its own cache, no pool
    assert torch.equal(first.images, fresh.images)
    assert second.kv_allocated_bytes == 4 * static_engine.kv_bytes_per_image()


def test_the_oom_cap_drops_and_recovers_after_successful_batches(static_engine):
    manager = manager_for(static_engine, 8, recover_after=2)
    assert manager.cap == manager.pool_images == 8
    assert manager.note_oom(8) == 4 and manager.admissible() == 4
    assert manager.note_oom(3) == 2 and manager.state().cap == 2
    manager.generate([1], [1], [PARAMS])
    assert manager.cap == 2  # one success is not yet enough
    manager.generate([1, 2], [1, 2], [PARAMS] * 2)
    assert manager.cap == 4
    manager.note_oom(4)  # an OOM resets the count of successes
    manager.generate([1], [1], [PARAMS])
    assert manager.cap == 2
    for _ in range(4):
        manager.generate([1], [1], [PARAMS])
    assert manager.cap == manager.admissible() == 8  # back to the pool, never above it


def test_online_expansion_beyond_the_profile_is_an_exception_not_a_reservation(golden_engine):
    var, vae, dtype, device = golden_engine.var, golden_engine.vae, golden_engine.dtype, golden_engine.device
    pn = golden_engine.config.patch_nums
    worst = Engine(var, vae, make_policy("amskv", pn, {"theta": 2.0}), dtype, device)  # every layer expands
    planned = Engine(var, vae, make_policy("amskv", pn, {"theta": 2.0}, profile=(True, False)), dtype, device)
    assert planned.kv_bytes_per_image() < worst.kv_bytes_per_image()  # the plan reserves layer 0 only
    labels, seeds = [3, 4], [0, 1]
    reference = worst.generate_tokens(labels, seeds, PARAMS)
    pool = planned.new_pool(2)
    pointers = [t.data_ptr() for t in pool.k + pool.v]
    run = planned.generate_tokens(labels, seeds, PARAMS, pool=pool)
    assert reference.unplanned_expansions == [] and run.unplanned_expansions == [1]
    assert run.expansions == reference.expansions == {0: 7, 1: 7}  # first overflow: 10x10 (255 > 174 tokens)
    assert all(torch.equal(a, b) for a, b in zip(run.tokens, reference.tokens))  # same decisions, same images
    assert run.kv_peak_stored_bytes == reference.kv_peak_stored_bytes
    assert planned.memory(2).allocated_bytes < run.kv_allocated_bytes  # the growth is counted on top of the plan
    assert [t.data_ptr() for t in pool.k + pool.v] == pointers  # the pool itself stays as planned
    # a budget with room beyond the pool (tests/amskv/kvcache/test_budget.py refuses growth that does not fit)
    manager = KVCacheManager(planned, max_batch=4, cpu_budget_bytes=8 * planned.kv_bytes_per_image())
    manager.warm_up(PARAMS)
    manager.generate(labels, seeds, [PARAMS] * 2)
    assert manager.state().unplanned_expansions == 1  # this batch expanded layer 1 (warm-up is not counted)
    assert manager.state().refused_expansions == 0
    assert math.isfinite(manager.state().budget_bytes)


def test_in_the_schedulers_slots_an_unplanned_expansion_is_refused_and_nothing_grows(golden_engine):
    from amskv.scheduler import ImageSpec, Scheduler

    var, vae, dtype, device = golden_engine.var, golden_engine.vae, golden_engine.dtype, golden_engine.device
    pn = golden_engine.config.patch_nums
    planned = Engine(var, vae, make_policy("amskv", pn, {"theta": 2.0}, profile=(True, False)), dtype, device)
    manager = KVCacheManager(planned, cpu_budget_bytes=2 * planned.kv_bytes_per_image())  # no room to grow
    manager.warm_up(PARAMS)
    pointers = [t.data_ptr() for t in manager.pool.k + manager.pool.v]
    scheduler = Scheduler(planned, manager)
    scheduler.admit([ImageSpec(3, 0, PARAMS, frozenset(), 0), ImageSpec(4, 1, PARAMS, frozenset(), 1)])
    refused, cohorts = 0, list(scheduler.cohorts)
    while scheduler.cohorts:
        refused += scheduler.step().refused_expansions
    assert refused == 2  # layer 1 of each image (one image per cohort online), kept at c_min
    for cohort in cohorts:
        assert cohort.cache.expansions() == {0: 7} and cohort.cache.refused_expansions() == [1]
        assert cohort.cache.unplanned_bytes == 0 and cohort.cache.allocated_bytes == planned.memory(1).allocated_bytes
    assert [t.data_ptr() for t in manager.pool.k + manager.pool.v] == pointers and manager.free_images() == 2


def test_allocated_bytes_count_a_replaced_grown_buffer_only_while_both_are_held(golden_engine):
    from amskv.generate import allocate_cache

    policy = make_policy("amskv", golden_engine.config.patch_nums, {"theta": 2.0}, profile=(True, False))
    cache = allocate_cache(golden_engine.var, policy, 1, torch.float32, golden_engine.device)
    planned = cache.allocated_bytes
    cache.note_growth(100, 0)  # layer 1 grows beyond its plan
    cache.note_growth(150, 100)  # then again: both buffers exist while the kept scales are copied
    cache.note_growth(50, 0)  # another layer grows; the first layer's 100 bytes were freed
    assert cache.allocated_bytes == planned + 250  # the peak held at once, not 100 + 150 + 50
