"""The scheduler and the engine step (amskv/scheduler.py, amskv/step.py) on the bundled demo model.

The reference is the whole-batch sampler (``Engine.generate``, amskv/generate.py) with each image alone:
an image must be bit-identical to it whatever it shares its steps with and at whatever boundary it joins.
This is the product's batch-invariance promise, so the comparisons are exact (tests/README.md).
"""
from __future__ import annotations

import random

import pytest
import torch

from amskv.engine import Engine
from amskv.kvcache.manager import KVCacheManager
from amskv.kvcache.policy import POLICY_NAMES
from amskv.sampling import SamplingParams
from amskv.scheduler import ImageSpec, Scheduler

PARAMS = (SamplingParams(cfg=3.0, top_k=50, top_p=0.9), SamplingParams(cfg=1.5, top_k=0, top_p=0.0),
          SamplingParams(cfg=4.0, top_k=900, top_p=0.95, more_smooth=True), SamplingParams(cfg=2.0, top_k=5, top_p=0.0))


@pytest.fixture(scope="module")
def demo():
    return Engine.load(model="demo")


def specs(count: int, seed0: int = 0, previews: bool = False) -> list[ImageSpec]:
    return [ImageSpec(label=(3 * i + seed0) % 10, seed=seed0 + 17 * i, params=PARAMS[i % len(PARAMS)],
                      previews=frozenset({1, 4}) if previews and i % 2 else frozenset(), tag=i) for i in range(count)]


def alone(engine: Engine, spec: ImageSpec) -> torch.Tensor:
    return engine.generate([spec.label], [spec.seed], [spec.params]).images[0]


def run(engine: Engine, arrivals: dict[int, list[ImageSpec]], *, slots: int, mode: str = "continuous",
        cancel: set | None = None) -> tuple[dict, list]:
    """Steps the scheduler; arrivals[k] join the queue before step k. Returns images by tag and step outcomes."""
    manager = KVCacheManager(engine, max_batch=slots)
    manager.warm_up(SamplingParams())
    scheduler = Scheduler(engine, manager, mode=mode)
    queue, images, outcomes, step = [], {}, [], 0
    while queue or scheduler.cohorts or any(k >= step for k in arrivals):
        queue += arrivals.get(step, [])
        scheduler.drop(lambda spec: cancel is not None and spec.tag in cancel and step >= 3)
        started = scheduler.admit(queue[:scheduler.room()]) if queue else 0
        queue = queue[started:]
        outcome = scheduler.step()
        outcomes.append(outcome)
        images.update({spec.tag: image for spec, image in outcome.images})
        step += 1
        assert step < 500, "the scheduler made no progress"
    assert manager.free_images() == slots, "every slot must come back"
    return images, outcomes


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_an_image_is_bit_identical_whatever_it_joins(demo, policy):
    engine = demo.with_policy(policy)
    if policy == "amskv-static":
        engine = Engine.load(model="demo", policy=policy)  # with the shipped calibration profile
    rng = random.Random(hash(policy) % 1000)
    pending = specs(9, seed0=rng.randrange(1000), previews=True)
    # joins at many boundaries, several at one, with too few slots for all (so some wait for room)
    arrivals = {0: pending[:3], 1: pending[3:4], 2: pending[4:6], 5: pending[6:8], 6: pending[8:]}
    images, outcomes = run(engine, arrivals, slots=5)
    assert sorted(images) == list(range(9))
    assert any(len(o.rows_per_scale) > 1 for o in outcomes), "some step must mix scales"
    for spec in pending:
        assert torch.equal(images[spec.tag], alone(engine, spec)), f"{policy}: image {spec.tag} changed with its mates"


def test_previews_do_not_change_the_image_and_come_at_the_asked_scales(demo):
    with_previews, without = specs(4, seed0=40, previews=True), specs(4, seed0=40)
    got_a, outcomes = run(demo, {0: with_previews[:2], 2: with_previews[2:]}, slots=8)
    got_b, _ = run(demo, {0: without}, slots=8)
    assert all(torch.equal(got_a[t], got_b[t]) for t in range(4))
    seen = sorted((spec.tag, scale) for o in outcomes for spec, scale, _ in o.previews)
    assert seen == [(1, 1), (1, 4), (3, 1), (3, 4)]


def test_static_mode_admits_only_when_nothing_runs(demo):
    batch = specs(6, seed0=7)
    images, outcomes = run(demo, {0: batch[:3], 2: batch[3:]}, slots=8, mode="static")
    assert all(len(o.rows_per_scale) <= 1 for o in outcomes), "static steps never mix scales"
    assert [o.admitted for o in outcomes if o.admitted] == [3, 3]
    scales = demo.config.num_scales
    assert outcomes[scales].admitted == 3  # the second batch starts right after the first one ends
    assert all(torch.equal(images[s.tag], alone(demo, s)) for s in batch)


def test_continuous_mode_admits_at_the_next_boundary(demo):
    batch = specs(4, seed0=9)
    _, outcomes = run(demo, {0: batch[:3], 2: batch[3:]}, slots=8)
    assert outcomes[2].admitted == 1 and outcomes[2].rows_per_scale == {2: 3, 0: 1}


def test_cancelled_images_leave_at_the_next_boundary_and_free_their_slots(demo):
    batch = specs(5, seed0=3)
    images, outcomes = run(demo, {0: batch}, slots=5, cancel={1, 3})
    assert sorted(images) == [0, 2, 4]
    assert sum(o.cancelled for o in outcomes) == 2
    assert outcomes[3].rows == 3  # dropped before step 3
    assert all(torch.equal(images[t], alone(demo, batch[t])) for t in (0, 2, 4))  # survivors split, unchanged


def test_a_request_larger_than_the_room_is_admitted_as_slots_free(demo):
    batch = specs(7, seed0=11)
    images, outcomes = run(demo, {0: batch}, slots=3)
    assert max(o.rows for o in outcomes) == 3 and sorted(images) == list(range(7))


class OutOfMemoryOnce:
    """The engine, with its next step of more than ``above`` images running out of memory (before any work)."""

    def __init__(self, engine: Engine, above: int) -> None:
        self.engine, self.above, self.fired, self.armed = engine, above, 0, False

    def step(self, cohorts):
        if self.armed and not self.fired and sum(c.n for c in cohorts) > self.above:
            self.fired += 1
            raise torch.OutOfMemoryError("test: out of memory")
        return self.engine.step(cohorts)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_out_of_memory_restarts_the_step_with_fewer_images_and_loses_nothing(demo):
    manager = KVCacheManager(demo, max_batch=8)
    manager.warm_up(SamplingParams())
    faulty = OutOfMemoryOnce(demo, above=2)
    scheduler = Scheduler(faulty, manager)
    batch = specs(6, seed0=21)
    scheduler.admit(batch)
    scheduler.step()  # scale 0 for all six
    faulty.armed = True
    outcome = scheduler.step()  # runs out of memory: all restart, at most 3 per step from now on
    assert outcome.out_of_memory and not outcome.failed and manager.cap == 3
    images = {}
    while scheduler.cohorts:
        step = scheduler.step()
        assert step.rows <= 3
        images.update({s.tag: im for s, im in step.images})
    assert all(torch.equal(images[s.tag], alone(demo, s)) for s in batch)


def test_a_failing_step_fails_its_images_and_frees_their_slots(demo):
    class Broken:
        def __init__(self, engine):
            self.engine = engine

        def step(self, cohorts):
            raise RuntimeError("test: broken step")

        def __getattr__(self, name):
            return getattr(self.engine, name)

    manager = KVCacheManager(demo, max_batch=4)
    manager.warm_up(SamplingParams())
    scheduler = Scheduler(Broken(demo), manager)
    scheduler.admit(specs(3))
    outcome = scheduler.step()
    assert [s.tag for s in outcome.failed] == [0, 1, 2] and isinstance(outcome.error, RuntimeError)
    assert manager.free_images() == 4 and not scheduler.cohorts


def test_online_amskv_decides_per_image(demo):
    engine = demo.with_policy("amskv")
    scheduler = Scheduler(engine, KVCacheManager(engine, max_batch=4))
    scheduler.manager.warm_up(SamplingParams())
    scheduler.admit(specs(3))
    assert [c.n for c in scheduler.cohorts] == [1, 1, 1]  # one cohort per image: its own keys decide


def test_slot_allocation_is_first_fit_and_release_merges(demo):
    manager = KVCacheManager(demo, max_batch=6)
    manager.warm_up(SamplingParams())
    assert manager.allocate(2) == [(0, 2)] and manager.allocate(2) == [(2, 2)]
    manager.release(0, 2)
    assert manager.allocate(3) == [(0, 2), (4, 1)] and manager.free_images() == 1
    manager.release(0, 2)
    manager.release(4, 1)
    manager.release(2, 2)
    assert manager.free_images() == 6 and manager.allocate(6) == [(0, 6)]
    with pytest.raises(ValueError, match="twice"):
        manager.release(0, 1)
        manager.release(0, 1)


def test_a_step_runs_at_most_the_token_budget_oldest_first(demo):
    manager = KVCacheManager(demo, max_batch=8)
    manager.warm_up(SamplingParams())
    last = 2 * demo.config.scale_tokens[-1]
    manager.step_token_cap = lambda: 3 * last  # as if the device held three images at their last scale
    scheduler = Scheduler(demo, manager)
    batch = specs(8, seed0=5)
    scheduler.admit(batch[:5])
    images, tokens = {}, []
    for step in range(60):
        if step == 3:
            scheduler.admit(batch[5:])
        if not scheduler.cohorts:
            break
        outcome = scheduler.step()
        tokens.append(outcome.tokens)
        images.update({s.tag: im for s, im in outcome.images})
    assert max(tokens) <= 3 * last and sorted(images) == list(range(8))
    assert all(torch.equal(images[s.tag], alone(demo, s)) for s in batch)
