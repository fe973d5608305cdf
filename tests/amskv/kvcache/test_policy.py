"""Policy semantics, step by step, on token counts (no model needed)."""
import itertools
import json
import math
import random

import pytest

from amskv.config import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_DEMO
from amskv.kvcache.policy import AMSKV_PRESETS, LayerState, OnlineAMSKVPolicy, StaticAMSKVPolicy, make_policy
from amskv.kvcache.profile import read_profile

TOKENS_256 = tuple(p * p for p in PATCH_NUMS_256)  # 1 4 9 16 25 36 64 100 169 256


def run_layer(policy, scale_tokens=TOKENS_256, demanding=lambda si: False, layer=0):
    """Feed one layer every scale; returns (kept after each scale, decisions, scales the test was asked at)."""
    state = policy.init_layer(layer)
    kept, decisions, asked = [], [], []

    def similarity_at(si):
        def sim():
            asked.append(si)
            return -math.inf if demanding(si) else math.inf
        return sim

    for si in range(len(scale_tokens)):
        before = list(state.kept)
        d = policy.decide(state, layer, si, scale_tokens, similarity_at(si))
        # the decision describes exactly the change of the kept list
        expected = [s for s in before if s not in d.evict] + ([si] if d.keep else [])
        assert state.kept == expected
        kept.append(list(state.kept))
        decisions.append(d)
    return kept, decisions, asked, state


def test_amskv_cache_efficient_layer_step_by_step():
    kept, _, asked, state = run_layer(OnlineAMSKVPolicy(c_cds=2, c_min=100, c_max=155))
    assert kept == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5],
                    [0, 1, 6],  # 155 > 100: intermediate scales 2..5 leave oldest first
                    [0, 1, 7],  # 169 > 100: 6 leaves; 7 (the newest) stays although 105 > 100
                    [0, 1, 7],  # 169 tokens > c_max: skipped, nothing evicted
                    [0, 1, 7]]  # the last scale is never stored
    assert asked == [6, 7]  # the test runs at each overflow while the layer has not expanded
    assert state.expanded_at is None and state.budget == 100


def test_amskv_cache_demanding_layer_expands_once():
    kept, _, asked, state = run_layer(OnlineAMSKVPolicy(c_cds=2, c_min=100, c_max=155), demanding=lambda si: True)
    assert kept[6] == [0, 1, 2, 3, 4, 5, 6]  # budget grew to 155: everything fits
    assert kept[7] == [0, 1, 7]  # 255 > 155: 2..6 leave
    assert asked == [6]  # after the expansion the similarity is never asked again
    assert (state.expanded_at, state.budget) == (6, 155)


def test_late_expansion_and_window_is_whatever_fits():
    kept, _, asked, state = run_layer(OnlineAMSKVPolicy(c_cds=2, c_min=100, c_max=155), demanding=lambda si: si == 7)
    assert asked == [6, 7] and state.expanded_at == 7
    assert kept[6] == [0, 1, 6] and kept[7] == [0, 1, 7]


def test_skip_rule_and_locked_scales_with_tight_budget():
    kept, decisions, _, _ = run_layer(OnlineAMSKVPolicy(c_cds=2, c_min=64, c_max=64))
    for si in (7, 8, 9):  # 100, 169, 256 tokens > c_max = 64: not inserted, nothing evicted
        assert decisions[si].keep is False and decisions[si].evict == ()
        assert kept[si] == kept[6]
    assert kept[6] == [0, 1, 6]


def test_evict_newest_switch():
    pol = OnlineAMSKVPolicy(c_cds=2, c_min=50, c_max=200, evict_newest=True)
    kept, decisions, _, _ = run_layer(pol)
    assert decisions[8].keep is False  # 169 tokens alone overflow c_min = 50: the newest leaves too
    assert kept[8] == [0, 1]
    kept_default, _, _, _ = run_layer(OnlineAMSKVPolicy(c_cds=2, c_min=50, c_max=200))
    assert kept_default[8] == [0, 1, 8]


@pytest.mark.parametrize("patch_nums", [PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_DEMO])
def test_invariants_over_random_parameters_and_similarities(patch_nums):
    """Locked scales never leave, expansion happens at most once, skipped scales never appear,
    a layer holds at most max(budget, locked + newest) tokens."""
    rng = random.Random(0)
    tokens = tuple(p * p for p in patch_nums)
    cum = list(itertools.accumulate(tokens))
    for _ in range(300):
        c_cds = rng.randint(0, 3)
        c_min = rng.choice([0, 5] + cum)
        c_max = rng.choice([c for c in [c_min] + cum if c >= c_min])
        pol = OnlineAMSKVPolicy(c_cds=c_cds, c_min=c_min, c_max=c_max, evict_newest=rng.random() < 0.3)
        pattern = [rng.random() < 0.5 for _ in tokens]
        state = pol.init_layer(0)
        budgets = [state.budget]
        for si in range(len(tokens)):
            pol.decide(state, 0, si, tokens, lambda si=si: -1.0 if pattern[si] else 1.0)
            budgets.append(state.budget)
            locked = [s for s in range(min(c_cds, si + 1)) if tokens[s] <= c_max and s < len(tokens) - 1]
            assert all(s in state.kept for s in locked)
            assert all(tokens[s] <= c_max for s in state.kept) and len(tokens) - 1 not in state.kept
            assert state.kept == sorted(state.kept)
            size = sum(tokens[s] for s in state.kept)
            newest = tokens[state.kept[-1]] if state.kept and state.kept[-1] not in locked else 0
            assert size <= max(state.budget, sum(tokens[s] for s in locked) + newest)
        assert sum(b != a for a, b in zip(budgets, budgets[1:])) <= 1  # at most one expansion
        assert set(budgets) <= {c_min, c_max}


def test_vanilla_full_window_sink():
    assert run_layer(make_policy("vanilla", PATCH_NUMS_256))[0][-1] == list(range(10))
    assert run_layer(make_policy("full", PATCH_NUMS_256))[0][-1] == list(range(9))
    kept, *_ = run_layer(make_policy("window", PATCH_NUMS_256, {"window": 2}))
    assert kept[5] == [4, 5] and kept[-1] == [7, 8]
    kept, *_ = run_layer(make_policy("sink", PATCH_NUMS_256, {"sink": 2, "window": 1}))
    assert kept[5] == [0, 1, 5] and kept[-1] == [0, 1, 8]


def test_make_policy_presets_and_arguments(tmp_path):
    pol = make_policy("amskv", PATCH_NUMS_256, {"preset": "aggressive", "c_min": 50})
    assert (pol.c_cds, pol.c_min, pol.c_max) == (2, 50, AMSKV_PRESETS["aggressive"]["256"]["c_max"])
    assert make_policy("amskv", PATCH_NUMS_512).c_max == AMSKV_PRESETS["default"]["512"]["c_max"]
    assert make_policy("amskv", PATCH_NUMS_DEMO).c_min == AMSKV_PRESETS["default"]["demo"]["c_min"]
    assert make_policy("amskv-static", PATCH_NUMS_256, {"demanding": "0110"}).demanding == (False, True, True, False)
    assert make_policy("amskv-static", PATCH_NUMS_256, {"demanding": "1,0"}).demanding == (True, False)
    assert make_policy("amskv-static", PATCH_NUMS_256).describe().endswith("demanding_layers=all)")
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "amskv-profile/1", "depth": 3, "demanding": [False, True, False]}))
    assert read_profile(path).demanding == (False, True, False)
    assert make_policy("amskv-static", PATCH_NUMS_256, {"profile": str(path)}).demanding == (False, True, False)
    for bad in [("amskv", {"preset": "nope"}), ("amskv", {"profile": str(path)}), ("window", {"c_min": 3}),
                ("amskv-static", {"demanding": "012"}), ("lru", {})]:
        with pytest.raises(ValueError):
            make_policy(bad[0], PATCH_NUMS_256, bad[1])
    path.write_text(json.dumps({"format": "other", "demanding": [True]}))
    with pytest.raises(ValueError):
        read_profile(path)


def test_static_flags_replace_the_online_test():
    pol = StaticAMSKVPolicy((False, True), c_cds=2, c_min=100, c_max=155)
    for layer, expanded in ((0, None), (1, 6)):
        state = pol.init_layer(layer)
        assert isinstance(state, LayerState)
        for si in range(10):
            pol.decide(state, layer, si, TOKENS_256, lambda: pytest.fail("a static policy never asks"))
        assert state.expanded_at == expanded


def test_presets_follow_the_scale_rule():
    """Presets are written in scales (docs/kv-cache.md §4): c_min = condensed + the scale before the last,
    c_max = that + the one before it, on every released layout; the demo keeps its own token budgets."""
    from amskv.kvcache.policy import DEMO_PRESETS, preset_budgets

    assert AMSKV_PRESETS["default"]["256"] == {"c_cds": 2, "c_min": 5 + 169, "c_max": 5 + 169 + 100}
    assert AMSKV_PRESETS["default"]["512"] == {"c_cds": 2, "c_min": 5 + 24 * 24, "c_max": 5 + 24 * 24 + 18 * 18}
    assert AMSKV_PRESETS["default"]["demo"] == DEMO_PRESETS["default"]
    assert preset_budgets({"c_cds": 1, "local_min": 0, "local_max": 3}, PATCH_NUMS_256) == \
        {"c_cds": 1, "c_min": 1, "c_max": 1 + 169 + 100 + 64}
    for preset in AMSKV_PRESETS:  # the rule keeps the previous scale in every layer, demanding or not
        for patch_nums in (PATCH_NUMS_256, PATCH_NUMS_512):
            kept, *_ = run_layer(make_policy("amskv", patch_nums, {"preset": preset}),
                                 tuple(pn * pn for pn in patch_nums), demanding=lambda si: False)
            assert len(patch_nums) - 2 in kept[-2]


def test_theta_defaults_sit_where_docs_kv_cache_md_says_on_the_shipped_profiles():
    """docs/kv-cache.md §Presets: the demo's theta is the calibration rule's value (online_theta) to two decimals;
    the 256/512 px default 0.8 is at or above the rule's value on mnist64 (the one 256 px model here), inside the
    plateau of mnist64's per-layer lowest cosines where the online decisions are {0, 1, 3, 5}."""
    from importlib import resources

    from amskv.kvcache.policy import online_theta
    from amskv.kvcache.profile import read_profile

    weights = resources.files("amskv") / "weights"
    demo, mnist64 = (read_profile(weights / f"{name}_profile.json") for name in ("demo", "mnist64"))
    assert round(online_theta(demo), 2) == AMSKV_PRESETS["default"]["demo"]["theta"] == 0.45
    default = OnlineAMSKVPolicy().theta  # the 256 and 512 px presets set no theta of their own
    assert "theta" not in AMSKV_PRESETS["default"]["256"] and default == 0.8
    assert default >= online_theta(mnist64)
    lowest = {layer: min(by[s] for s in mnist64.test_scales) for layer, by in mnist64.similarity.items()}
    below = {layer for layer, value in lowest.items() if value < default}
    assert below == {0, 1, 3, 5}
    assert max(lowest[layer] for layer in below) < default <= min(v for k, v in lowest.items() if k not in below)
