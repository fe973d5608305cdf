"""Exact memory: predicted bytes equal the bytes the storage holds in a real generation, for every policy."""
import math

import pytest
import torch

from amskv.config import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_DEMO, VAR_PRESETS
from amskv.kvcache.policy import AMSKV_PRESETS, OnlineAMSKVPolicy, make_policy
from amskv.memory import all_demanding, kv_memory, max_batch, plan_kv, static_and_worst
from amskv.sampling import SamplingParams

LABELS, SEEDS = [207, 1], [0, 5]
INF = float("inf")


@pytest.fixture(scope="module")
def runs(golden_engine):
    cache = {}

    def run(name, **args):
        key = (name, tuple(sorted(args.items())))
        if key not in cache:
            engine = golden_engine.with_policy(name, args)
            cache[key] = engine, engine.generate_tokens(LABELS, SEEDS, SamplingParams())
        return cache[key]
    return run


def recorded(result):
    """The similarity oracle of a finished run: what the online test saw (inf where it never asked)."""
    return lambda layer, si: result.similarities.get(layer, {}).get(si, INF)


def tokens_of(result):
    return torch.cat(result.tokens, dim=1)


def check_exact(engine, result):
    cfg, B = engine.config, len(LABELS)
    predicted_alloc = kv_memory(cfg, engine.policy, B, engine.dtype)  # what a batch allocates (worst case)
    predicted_held = kv_memory(cfg, engine.policy, B, engine.dtype, similarity=recorded(result))
    assert result.kv_allocated_bytes == predicted_alloc.allocated_bytes
    assert result.kv_peak_stored_bytes == predicted_held.peak_stored_bytes
    plan = plan_kv(engine.policy, cfg.patch_nums, cfg.depth, recorded(result))
    assert result.kept_after_scale == [list(map(list, step)) for step in plan.kept]
    assert result.expansions == plan.expanded_at


@pytest.mark.parametrize("name,args", [
    ("vanilla", {}), ("full", {}), ("window", {}), ("sink", {}), ("amskv", {}),
    ("amskv", {"preset": "aggressive"}), ("amskv", {"theta": -2.0}), ("amskv-static", {}),
    ("amskv-static", {"demanding": "01"}),
])
def test_predicted_bytes_equal_held_bytes(runs, name, args):
    engine, result = runs(name, **args)
    check_exact(engine, result)


def test_online_amskv_with_mixed_layers(runs):
    """theta between the two layers' similarities: exactly one layer expands, and the figures still match."""
    engine, first = runs("amskv", theta=-2.0)
    test_scale = min(first.similarities[0])  # the first overflow (scale 7 with the 174/274 preset)
    assert test_scale == min(first.similarities[1]) == 7
    s0, s1 = first.similarities[0][test_scale], first.similarities[1][test_scale]
    assert s0 != s1
    engine, mixed = runs("amskv", theta=(s0 + s1) / 2)
    assert mixed.expansions == {(0 if s0 < s1 else 1): test_scale}
    check_exact(engine, mixed)
    # the allocation is the worst case; the run held less than that
    worst = kv_memory(engine.config, engine.policy, len(LABELS), engine.dtype)
    assert mixed.kv_peak_stored_bytes < worst.peak_stored_bytes


def test_full_matches_vanilla_and_large_cmin_matches_full(runs):
    _, vanilla = runs("vanilla")
    _, full = runs("full")
    _, big = runs("amskv", c_min=680, c_max=680)
    assert torch.equal(tokens_of(full), tokens_of(vanilla))
    assert torch.equal(tokens_of(big), tokens_of(full))
    assert big.kv_peak_stored_bytes == full.kv_peak_stored_bytes < vanilla.kv_peak_stored_bytes
    _, small = runs("amskv")
    assert not torch.equal(tokens_of(small), tokens_of(full))  # the comparison can fail


def test_vanilla_d30_bf16_bytes():
    d30 = VAR_PRESETS["d30"].var
    vanilla = kv_memory(d30, make_policy("vanilla", d30.patch_nums), 1, "bf16")
    assert vanilla.allocated_bytes == vanilla.peak_stored_bytes == 4 * 30 * 680 * 1920 * 2
    full = kv_memory(d30, make_policy("full", d30.patch_nums), 1, "bf16")
    per_token = 4 * 1920 * 2
    assert full.peak_stored_bytes == 30 * 424 * per_token
    assert full.allocated_bytes == (30 * 424 + 680) * per_token  # + the workspace for the last scale
    ams = kv_memory(d30, make_policy("amskv", d30.patch_nums), 1, "bf16")
    # default preset at 256 px: 174/274 tokens; every layer may expand (no profile), so each keeps 0, 1, 7 and 8
    # (5 + 100 + 169 = 274); the last scale attends in the workspace, 274 + 256 tokens
    assert ams.allocated_bytes == (30 * 274 + 530) * per_token
    assert kv_memory(d30, make_policy("amskv", d30.patch_nums), 256, "bf16").allocated_bytes == 256 * ams.allocated_bytes


def test_static_and_worst_cases():
    d30 = VAR_PRESETS["d30"].var
    online = static_and_worst(d30, make_policy("amskv", d30.patch_nums), 1, "bf16")
    assert set(online) == {"worst_case", "no_expansion"}
    assert online["no_expansion"]["allocated_bytes"] < online["worst_case"]["allocated_bytes"]
    static = static_and_worst(d30, make_policy("amskv-static", d30.patch_nums, {"demanding": "1" + "0" * 29}), 1, "bf16")
    assert set(static) == {"worst_case", "exact"}
    assert static["exact"]["allocated_bytes"] < online["worst_case"]["allocated_bytes"]
    assert set(static_and_worst(d30, make_policy("full", d30.patch_nums), 1, "bf16")) == {"worst_case"}


def test_max_batch():
    assert max_batch(60 * 2**30, 4 * 30 * 680 * 1920 * 2) == 205
    assert max_batch(10**15, 1) == 256 and max_batch(5, 10) == 0


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_DEMO])
@pytest.mark.parametrize("preset", sorted(AMSKV_PRESETS))
def test_worst_case_allocation_fits_every_online_outcome(patch_nums, preset):
    """The allocation (all layers demanding) holds every pattern the online test can produce."""
    pol = make_policy("amskv", patch_nums, {"preset": preset})
    for evict_newest in (False, True):
        policy = OnlineAMSKVPolicy(pol.c_cds, pol.c_min, pol.c_max, pol.theta, evict_newest)
        tokens = [p * p for p in patch_nums]

        def kept_peak(plan):
            return max(sum(tokens[s] for s in step[0]) for step in plan.kept)

        worst = plan_kv(policy, patch_nums, 1, all_demanding)
        for mask in range(2 ** len(patch_nums)):
            plan = plan_kv(policy, patch_nums, 1, lambda layer, si: -math.inf if mask >> si & 1 else math.inf)
            # what any outcome keeps and attends over stays within the worst case, however the plan sizes
            # buffers and workspace from those two peaks
            assert kept_peak(plan) <= kept_peak(worst)
            assert plan.working_set[0] <= worst.working_set[0]
            assert plan.working_set[0] <= max(worst.capacities[0], worst.workspace_tokens)


def allocator_bytes(run) -> list[int]:
    """Bytes each operator took from the CPU allocator while ``run()`` executed (torch.profiler's memory
    hooks on the allocator; one entry per allocating operator, net of what that operator itself freed)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = run()
    del kept
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("name,args", [("vanilla", {}), ("full", {}), ("amskv", {}), ("amskv-static", {"demanding": "01"})])
@pytest.mark.parametrize("batch", [1, 3])
def test_allocator_sees_exactly_the_predicted_kv_bytes(golden_engine, name, args, batch):
    """The storage's counters are not the judge here: the CPU allocator's own memory events are."""
    from amskv.generate import allocate_cache

    engine = golden_engine.with_policy(name, args)
    predicted = kv_memory(engine.config, engine.policy, batch, engine.dtype)
    # The cache a generation builds (generate_tokens calls allocate_cache): every allocation is a KV buffer.
    sizes = allocator_bytes(lambda: allocate_cache(engine.var, engine.policy, batch, engine.dtype, engine.device))
    assert sum(sizes) == predicted.allocated_bytes
    expected = [b // 2 for b in predicted.per_layer_bytes for _ in "kv"]  # one K and one V buffer per layer
    if predicted.workspace_bytes:
        expected += [predicted.workspace_bytes // 2] * 2
    assert sorted(sizes) == sorted(expected)
    # A real generation allocates those same buffers (among its activations).
    during_run = allocator_bytes(lambda: engine.generate_tokens(list(range(batch)), list(range(batch)), SamplingParams()))
    for size in set(expected):
        assert during_run.count(size) >= expected.count(size), size
