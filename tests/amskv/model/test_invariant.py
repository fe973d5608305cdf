"""Batch invariance as the engine chooses it at load (amskv/model/invariant.py, invariance_probe.py).

An image must be bit-identical alone and inside any batch (the product's promise, tests/README.md), so the
comparisons are exact. They compare each image's f_hat, not only its tokens: a more_smooth row's soft codes
feed f_hat straight from the logits, so a last-bit change anywhere in the transformer shows there, where a
sampled token would usually hide it. The probe decides at run time, so no test assumes which form it picks
on this CPU: a wrong choice is made on purpose (a floor forced below the one found), and on a simulated GEMM
that rounds differently below 16 rows, which behaves the same on every machine.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amskv.engine import Engine
from amskv.model import invariance_probe, invariant
from amskv.model.invariance_probe import check_form, scheduler_row_counts
from amskv.model.invariant import GemmForm, gemm_into
from amskv.sampling import SamplingParams

SMOOTH = SamplingParams(cfg=2.0, top_k=50, top_p=0.9, more_smooth=True)
OTHERS = (SamplingParams(cfg=3.0, top_k=0, top_p=0.0), SamplingParams(cfg=1.5, top_k=900, top_p=0.95),
          SamplingParams(cfg=0.5, top_k=100, top_p=0.8, more_smooth=True))
TARGET = (7, 1234)  # label, seed of the image followed everywhere
# images per call: 2 rows each, so every scale's row count 2 x images x tokens changes with it; 5 and more
# from 9 on pass the 1024-row pieces at the demo's last scale (64 tokens)
BATCHES = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16)


def demo(mode: str = "auto") -> Engine:
    return Engine.load(model="demo", policy="full", batch_invariant=mode)


def batch_of(size: int) -> tuple[list[int], list[int], list[SamplingParams]]:
    """The target image first, then size - 1 others with other labels, seeds and parameters."""
    labels = [TARGET[0]] + [(3 * i) % 10 for i in range(1, size)]
    seeds = [TARGET[1]] + [100 + i for i in range(1, size)]
    return labels, seeds, [SMOOTH] + [OTHERS[i % len(OTHERS)] for i in range(1, size)]


def differing_batches(engine: Engine, batches=BATCHES) -> list[int]:
    """Batch sizes in which the target's tokens or f_hat differ from the target alone (whole-batch sampler)."""
    alone = engine.generate_tokens([TARGET[0]], [TARGET[1]], [SMOOTH])
    bad = []
    for size in batches:
        res = engine.generate_tokens(*batch_of(size))
        same = torch.equal(res.f_hat[0], alone.f_hat[0]) and all(
            torch.equal(b[0], a[0]) for b, a in zip(res.tokens, alone.tokens, strict=True))
        if not same:
            bad.append(size)
    return bad


def packed_f_hat(engine: Engine, arrivals: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's f_hat and image from engine steps; arrivals[step] = images of a cohort joining before
    that step (the target's cohort joins at step 0 and is its first image), so one step packs cohorts at
    different scales: T = sum over cohorts of 2 x images x scale tokens."""
    pool = engine.new_pool(sum(arrivals.values()))
    cohorts, slot, step, result = [], 0, 0, None
    while result is None:
        if step in arrivals:
            n = arrivals[step]
            labels, seeds, params = batch_of(n) if step == 0 else (
                [(step + i) % 10 for i in range(n)], [50 * step + i for i in range(n)],
                [OTHERS[(step + i) % len(OTHERS)] for i in range(n)])
            cohorts.append(engine.start_cohort(pool, slot, labels, seeds, params, tags=[(step, i) for i in range(n)]))
            slot += n
        out = engine.step(cohorts)
        for cohort, images in out.finished:
            cohorts.remove(cohort)
            if cohort.tags[0] == (0, 0):
                result = (cohort.f_hat[0].clone(), images[0])
        step += 1
    return result


def test_the_chosen_form_keeps_an_image_identical_alone_and_in_every_batch():
    engine = demo()
    assert engine.invariance.mode == "auto"
    assert differing_batches(engine) == []


def test_the_chosen_form_keeps_an_image_identical_in_packed_steps_at_mixed_scales():
    engine = demo()
    alone_f_hat, alone_image = packed_f_hat(engine, {0: 1})
    for arrivals in ({0: 1, 1: 3}, {0: 2, 2: 5, 3: 1}, {0: 4, 1: 2, 4: 9}):
        f_hat, image = packed_f_hat(engine, arrivals)
        assert torch.equal(f_hat, alone_f_hat), f"arrivals {arrivals}"
        assert torch.equal(image, alone_image), f"arrivals {arrivals}"
    # and equal to the whole-batch sampler's image
    assert torch.equal(engine.generate([TARGET[0]], [TARGET[1]], [SMOOTH]).images[0], alone_image)


def test_a_floor_below_the_one_found_is_caught(monkeypatch):
    """Force every GEMM to a plain floor of 1 row; where this CPU's probe found a higher floor for some
    shape, the image-level comparison must see the difference. Where it found 1 everywhere, floor 1 is the
    correct choice and must pass."""
    found = demo().invariance.forms
    floors_found = {form.floor if form.kind == "floor" else invariant.ROW_TILE for form in found.values()}
    monkeypatch.setattr(invariance_probe, "check_form", lambda shape, device, counts: GemmForm("floor", 1, 512))
    wrong = demo()
    assert all(form.floor == 1 for form in wrong.invariance.forms.values())
    if floors_found == {1}:
        assert differing_batches(wrong) == []
    else:
        assert differing_batches(wrong) != []


def rounds_differently_below_16(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                out: torch.Tensor) -> None:
    """A GEMM like MKL's on an AMX Xeon: another kernel, and so other last bits, below 16 rows (here float64
    accumulation), the same kernel from 16 rows up."""
    if rows.shape[0] >= 16:
        gemm_into(rows, weight, bias, out)
        return
    wide = rows.double() @ weight.double().t()
    out.copy_(wide if bias is None else wide + bias.double())


def test_on_a_gemm_that_changes_below_16_rows_the_probe_finds_16_and_a_lower_floor_fails(monkeypatch):
    monkeypatch.setattr(invariant, "gemm_into", rounds_differently_below_16)
    engine = demo()
    assert all(form.kind == "tiles" or form.floor >= 16 for form in engine.invariance.forms.values())
    assert differing_batches(engine, (1, 2, 5, 9)) == []
    monkeypatch.setattr(invariance_probe, "check_form", lambda shape, device, counts: GemmForm("floor", 8, 512))
    assert differing_batches(demo(), (1, 2, 5, 9)) != []


def test_tiles_and_off_modes():
    tiles = demo("tiles")
    assert {form.kind for form in tiles.invariance.forms.values()} == {"tiles"}
    assert differing_batches(tiles, (1, 4, 9)) == []
    off = demo("off")
    assert {form.kind for form in off.invariance.forms.values()} == {"plain"}
    assert not off.invariance.conv_fixed and "off" in off.invariance.describe()
    with pytest.raises(ValueError, match="batch_invariant"):
        demo("sometimes")


def test_the_floor_form_computes_the_linear_map_at_every_row_count():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40), torch.randn(48)
    form = GemmForm("floor", 16, 64)
    for rows in (1, 7, 16, 64, 65, 150):
        x = torch.randn(2, rows, 40).transpose(0, 1)  # non-contiguous on purpose
        got = form.linear(x, weight, bias)
        assert got.shape == (rows, 2, 48)
        # another summation order than F.linear's: K = 40 products of N(0, 1) values stay below ~20 in
        # magnitude, where 40 float32 roundings are well under 1e-4
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=0, atol=1e-4)


def test_row_counts_cover_small_counts_single_cohorts_and_packed_remainders():
    tokens = (1, 4, 9, 16, 25, 36, 64)
    counts = scheduler_row_counts(tokens, chunk=512)
    assert set(range(1, 33)) <= set(counts) and max(counts) == 512
    assert {2 * t for t in tokens} | {(2 * 4 * 64) % 512 or 512} <= set(counts)


def test_check_form_falls_back_to_tiles_when_no_small_floor_holds(monkeypatch):
    def differs_everywhere(rows, weight, bias, out):  # a different result for every row count
        gemm_into(rows, weight, bias, out)
        out.add_(rows.shape[0] * 1e-3)

    monkeypatch.setattr(invariant, "gemm_into", differs_everywhere)
    assert check_form((8, 8, torch.float32, "linear"), torch.device("cpu"), [1, 2, 3, 100]).kind == "tiles"
