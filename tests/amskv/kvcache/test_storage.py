"""The preallocated storage: evicted memory is reused, kept K/V survive compaction unchanged, no concatenation."""
import ast
from pathlib import Path

import torch

from amskv.config import PATCH_NUMS_256
from amskv.kvcache.policy import OnlineAMSKVPolicy, StaticAMSKVPolicy, make_policy
from amskv.kvcache.storage import KVCache, KVPool
from amskv.memory import plan_kv
from amskv.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[3]
ROWS, HEADS, HD, DEPTH = 2, 2, 4, 3


def make_cache(policy, patch_nums=PATCH_NUMS_256, observer=None):
    plan = plan_kv(policy, patch_nums, DEPTH)
    pool = KVPool(ROWS // 2, HEADS, HD, list(plan.capacities), plan.workspace_tokens, torch.float32, "cpu")
    return KVCache(policy, patch_nums, pool, ROWS, observer=observer), plan


def drive(cache, patch_nums=PATCH_NUMS_256, seed=0):
    """Attend and commit every scale of every layer with random K/V; check storage invariants on the way."""
    gen = torch.Generator().manual_seed(seed)
    written = {}  # (layer, scale) -> (k, v)
    ptrs = [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]
    inserted = [0] * DEPTH
    for si, pn in enumerate(patch_nums):
        cache.begin_scale(si)
        for layer in cache.layers:
            q, k, v = (torch.randn(ROWS, HEADS, pn * pn, HD, generator=gen) for _ in range(3))
            k_all, v_all = layer.attend(q, k, v)
            # the view lies inside the layer buffer or the shared workspace: no fresh tensor
            owners = [layer.k.untyped_storage().data_ptr()]
            if cache.workspace is not None:
                owners.append(cache.workspace.k.untyped_storage().data_ptr())
            assert k_all.untyped_storage().data_ptr() in owners
            assert torch.equal(k_all[:, :, -pn * pn:], k) and torch.equal(v_all[:, :, -pn * pn:], v)
            written[layer.layer, si] = (k, v)
            layer.commit()
            if si in layer.kept_scales():
                inserted[layer.layer] += pn * pn
            for seg in layer.segments:  # content of every kept scale equals what was written
                wk, wv = written[layer.layer, seg.scale]
                assert torch.equal(layer.k[:, :, seg.start:seg.start + seg.length], wk)
                assert torch.equal(layer.v[:, :, seg.start:seg.start + seg.length], wv)
            assert [s.start for s in layer.segments] == \
                [sum(x.length for x in layer.segments[:i]) for i in range(len(layer.segments))]  # compacted
        cache.end_scale()
    assert ptrs == [(layer.k.data_ptr(), layer.v.data_ptr()) for layer in cache.layers]  # never reallocated
    return inserted


def test_amskv_storage_reuses_evicted_memory_and_keeps_content():
    policy = StaticAMSKVPolicy((True, False, True), c_cds=2, c_min=100, c_max=155)
    cache, plan = make_cache(policy)
    inserted = drive(cache)
    for layer in cache.layers:
        assert layer.capacity < inserted[layer.layer]  # more tokens went through the buffer than it can hold
        assert layer.capacity == plan.capacities[layer.layer]
    assert [layer.capacity for layer in cache.layers] == [155, 105, 155]
    assert cache.workspace is not None and cache.workspace.k.shape[2] == plan.workspace_tokens
    assert cache.kept_after_scale == [list(map(list, step)) for step in plan.kept]
    assert cache.expansions() == {0: 6, 2: 6}


def test_every_policy_keeps_content_through_compaction():
    for name, args in [("vanilla", {}), ("full", {}), ("window", {"window": 2}), ("sink", {}),
                       ("amskv", {"theta": 2.0}), ("amskv", {"theta": -2.0, "evict_newest": True})]:
        policy = make_policy(name, PATCH_NUMS_256, args)
        cache, plan = make_cache(policy)
        drive(cache)
        assert cache.allocated_bytes == plan.allocated_tokens * cache.token_bytes
        replay = plan_kv(policy, PATCH_NUMS_256, DEPTH,
                         lambda layer, si: cache.similarities.get(layer, {}).get(si, float("inf")))
        assert cache.peak_stored_tokens == replay.peak_stored_tokens
        assert cache.kept_after_scale == [list(map(list, step)) for step in replay.kept]


def test_online_similarity_is_recorded_and_matches_definition():
    cache, _ = make_cache(OnlineAMSKVPolicy(c_cds=2, c_min=100, c_max=155, theta=2.0))
    drive(cache)
    assert set(cache.similarities) == set(range(DEPTH))
    assert all(set(by_scale) == {6} for by_scale in cache.similarities.values())  # asked once, at the overflow


def test_generation_compacts_without_losing_kv(golden_engine):
    """During a real generation under AMS-KV, every kept scale a query sees equals the K/V written for it."""
    engine = golden_engine.with_policy("amskv")
    written, checked = {}, []

    def observer(layer, si, q, k_all, v_all, segments):
        T = q.shape[2]
        for seg in segments:
            k, v = written[layer, seg.scale]
            assert torch.equal(k_all[:, :, seg.start:seg.start + seg.length], k)
            assert torch.equal(v_all[:, :, seg.start:seg.start + seg.length], v)
            checked.append((layer, si, seg.scale))
        written[layer, si] = (k_all[:, :, -T:].clone(), v_all[:, :, -T:].clone())

    res = engine.generate_tokens([3, 7], [0, 1], SamplingParams(), observer=observer)
    assert {(layer, 8, 7) for layer in range(2)} <= set(checked)  # scale 7 came back from the workspace
    assert {(layer, 9, s) for layer in range(2) for s in res.kept_after_scale[8][layer]} <= set(checked)
    assert any(s not in res.kept_after_scale[-1][0] for s in range(2, 7))  # evictions did happen


def _calls_to_cat(tree) -> list[int]:
    names = {"cat", "concat", "concatenate"}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in names and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]


def test_no_concatenation_in_the_kv_path():
    for path in sorted((REPO / "amskv" / "kvcache").glob("*.py")):
        assert _calls_to_cat(ast.parse(path.read_text())) == [], path
    # generate.py: nothing inside the scale loop of generate_tokens concatenates (outside it only labels and
    # the decoder's padding are concatenated, never K/V)
    tree = ast.parse((REPO / "amskv" / "generate.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "generate_tokens")
    loops = [n for n in ast.walk(fn) if isinstance(n, ast.For)]
    assert loops and all(_calls_to_cat(loop) == [] for loop in loops)
    # the attention never concatenates K/V itself: it goes through kv.attend
    var_src = (REPO / "amskv" / "model" / "var.py").read_text()
    attn = next(n for n in ast.walk(ast.parse(var_src)) if isinstance(n, ast.ClassDef) and n.name == "SelfAttention")
    forward = next(n for n in attn.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    cats = [n for n in ast.walk(forward) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "cat"]
    assert all(ast.unparse(c.args[0]) == "(self.q_bias, self.zero_k_bias, self.v_bias)" for c in cats)
