"""Time-boxed sections of the GPU suite (``amskv_tools.bench.gpu``): the allocator's largest batch per policy,
the batch-invariance modes, and compile on/off.

Every section gets a ``Box``: a unit of work (one generation, one warm-up) starts only while the time left in
the box exceeds what the section expects it to take, from the units it has already timed. A unit not started
is recorded as ``SKIPPED``, never silently dropped, so a slow section cannot eat the script's 8 minutes and the
JSON says what did not run. A unit already running cannot be stopped (a CUDA kernel, an inductor compile):
the boxes are what the suite plans for, the script's ``timeout`` is the hard stop.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from amskv.device import release_cached_blocks
from amskv.engine import Engine
from amskv.kvcache.manager import KVCacheManager
from amskv.sampling import SamplingParams

SKIPPED = "skipped: time"
OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)
INVARIANCE_MODES = ("off", "auto", "tiles")


class Box:
    """A section's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = max(0.0, budget_s)
        self.start = time.monotonic()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def fits(self, estimate_s: float) -> bool:
        return self.left() > estimate_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def run_section(budget_s: float, fn: Callable[[Box], dict]) -> dict:
    """``fn(box)`` with its budget, timing and status recorded; a section with no time left is skipped whole."""
    box = Box(budget_s)
    if box.budget_s <= 0:
        return {"status": SKIPPED, "budget_s": 0.0, "section_s": 0.0}
    out = fn(box)
    out.setdefault("status", "ok")
    return {**out, "budget_s": round(box.budget_s, 1), "section_s": round(box.elapsed(), 2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(engine: Any, labels: Sequence[int], seeds: Sequence[int], params: SamplingParams,
                   run: Callable[..., Any] | None = None) -> dict:
    """One generation, timed to the end of its device work; {"status": "OOM"} instead of a crash."""
    sync(engine.device)
    t0 = time.perf_counter()
    try:
        res = (run or engine.generate)(list(labels), list(seeds), [params] * len(labels))
    except OOM_ERRORS:
        release_cached_blocks(engine.device)
        return {"status": "OOM"}
    sync(engine.device)
    return {"status": "ok", "seconds": time.perf_counter() - t0, "tokens": res.tokens}


def batch_inputs(batch: int, num_classes: int) -> tuple[list[int], list[int]]:
    return [i % num_classes for i in range(batch)], list(range(batch))


# --- the allocator's largest batch ---------------------------------------------------------------------------
def max_batch_section(base: Engine, policies: Sequence[tuple[str, str, dict]], params: SamplingParams, cap: int,
                      cpu_budget_bytes: int, box: Box) -> dict:
    """Per policy, the KV manager's warm-up sizes its pool from the device's free memory (the CPU: from
    ``cpu_budget_bytes``); one whole batch of that size then runs in the pool. Finally the first policy
    (vanilla) is asked for the largest batch the last one (AMS-KV) held: does it run out of memory there?"""
    out: dict[str, Any] = {"policies": {}}
    per_image_s = 0.0  # seconds per image of the batches run so far: the estimate of the next one
    for label, name, args in policies:
        if not box.fits(per_image_s * 3):  # a warm-up generates 1 and 2 images
            out["policies"][label] = {"status": SKIPPED}
            continue
        engine = base.with_policy(name, args)
        manager = KVCacheManager(engine, max_batch=cap, cpu_budget_bytes=cpu_budget_bytes)
        try:
            manager.warm_up(params)
        except OOM_ERRORS:
            out["policies"][label] = {"status": "OOM at warm-up"}
            release_cached_blocks(base.device)
            continue
        except ValueError as exc:  # the budget holds no image
            out["policies"][label] = {"status": f"no image fits: {exc}"}
            continue
        row: dict[str, Any] = {"status": "ok", **dataclasses.asdict(manager.state())}
        batch = row["pool_images"]
        if box.fits(per_image_s * batch):
            labels, seeds = batch_inputs(batch, engine.num_classes)
            run = timed_generate(engine, labels, seeds, params, run=manager.generate)
            run.pop("tokens", None)
            row["full_pool_batch"] = run
            if run["status"] == "ok":
                per_image_s = max(per_image_s, run["seconds"] / batch)
        else:
            row["full_pool_batch"] = {"status": SKIPPED}
        out["policies"][label] = row
        del manager  # the pool goes before the next policy measures what is free
        release_cached_blocks(base.device)
    first, last = (out["policies"].get(p[0], {}) for p in (policies[0], policies[-1]))
    if first.get("status") == last.get("status") == "ok":
        batch = last["pool_images"]
        out["first_at_last_max"] = {"policy": policies[0][0], "batch": batch}
        if box.fits(per_image_s * batch):
            labels, seeds = batch_inputs(batch, base.num_classes)
            run = timed_generate(base.with_policy(policies[0][1], policies[0][2]), labels, seeds, params)
            run.pop("tokens", None)
            out["first_at_last_max"].update(run)
        else:
            out["first_at_last_max"]["status"] = SKIPPED
        release_cached_blocks(base.device)
    return out


# --- batch-invariance modes ------------------------------------------------------------------------------
def invariance_supported() -> bool:
    return "batch_invariant" in inspect.signature(Engine.__init__).parameters


def engine_in_mode(base: Engine, mode: str | None = None) -> Engine:
    """``base``'s model, policy and device under invariance ``mode`` (default: ``base``'s own). Building it
    applies the mode to the modules ``base`` shares, so it also puts ``base``'s own mode back."""
    if not invariance_supported():
        return base
    chosen = mode or str(getattr(getattr(base, "invariance", None), "mode", "auto"))
    return Engine(base.var, base.vae, base.policy, base.dtype, base.device, base.model_name, batch_invariant=chosen)


def invariance_section(base: Engine, batch: int, params: SamplingParams, box: Box) -> dict:
    """images/s of one batch under each ``batch_invariant`` mode, and whether image 0 is bit-identical alone
    and inside the batch. The modes are applied to the shared modules when an engine is built, so each mode's
    engine is rebuilt right before each of its runs (the build, ``auto``'s check included, is timed apart)."""
    if not invariance_supported():
        return {"status": "unsupported", "modes": {m: {"status": "unsupported"} for m in INVARIANCE_MODES}}

    def make(mode: str) -> tuple[Engine, float]:
        t0 = time.perf_counter()
        engine = engine_in_mode(base, mode)
        return engine, time.perf_counter() - t0

    labels, seeds = batch_inputs(batch, base.num_classes)
    modes: dict[str, dict[str, Any]] = {m: {"status": SKIPPED, "samples": [], "build_s": []} for m in INVARIANCE_MODES}
    estimate = 0.0
    for rnd in range(1 + 2):  # round 0: the check (alone, in the batch) and a warm-up; then timed rounds
        for mode in INVARIANCE_MODES[rnd % 3:] + INVARIANCE_MODES[:rnd % 3]:
            row = modes[mode]
            if row["status"] not in ("ok", SKIPPED) or (rnd and row["status"] == SKIPPED):
                continue
            if not box.fits(estimate * (2 if rnd == 0 else 1)):
                continue
            engine, build_s = make(mode)
            row["build_s"].append(build_s)
            if rnd == 0:
                alone = timed_generate(engine, labels[:1], seeds[:1], params)
                mixed = timed_generate(engine, labels, seeds, params)
                row["status"] = mixed["status"] if alone["status"] == "ok" else alone["status"]
                if row["status"] == "ok":
                    row["bit_identical"] = all(torch.equal(a[0], m[0])
                                               for a, m in zip(alone["tokens"], mixed["tokens"], strict=True))
                    row["describe"] = getattr(getattr(engine, "invariance", None), "describe", lambda: None)()
                    estimate = max(estimate, mixed["seconds"] + build_s)
                continue
            run = timed_generate(engine, labels, seeds, params)
            if run["status"] == "ok":
                row["samples"].append(run["seconds"])
    for row in modes.values():
        if row["samples"]:
            secs = sorted(row["samples"])[len(row["samples"]) // 2]
            row.update(images_per_s=batch / secs, seconds=secs)
        row["build_s"] = max(row["build_s"]) if row["build_s"] else None
    engine_in_mode(base)  # the sections after this one run in the engine's own mode
    return {"status": "ok", "batch": batch, "modes": modes}


# --- compile on/off ------------------------------------------------------------------------------------------
def compile_section(base: Engine, batch: int, variant: str, backend: str, box: Box) -> dict:
    """One cohort through ``Engine.step``, eager against ``torch.compile`` (``compile_cpu.Compiled``:
    ``variant`` says what is compiled). The first compiled pass compiles; it cannot be interrupted, so the
    section starts it only with at least half its box left. A compiler error (no C/C++ compiler in the image,
    no Triton) is recorded, not raised. ``backend``: inductor on the GPU; the toy run in the tests uses
    aot_eager, which wires the same patches through dynamo without a minute of C++ compiling."""
    from amskv_tools.bench.compile_cpu import Compiled, run_images

    labels, seeds = batch_inputs(batch, base.num_classes)
    out: dict[str, Any] = {"variant": variant, "backend": backend, "batch": batch,
                           "off": {"samples": []}, "on": {"samples": []}}
    t0 = time.perf_counter()
    with torch.inference_mode():
        reference = run_images(base, labels, seeds)
        sync(base.device)
    estimate = time.perf_counter() - t0
    if not box.fits(max(box.budget_s / 2, 3 * estimate)):
        return {**out, "status": SKIPPED}
    torch._dynamo.reset()
    compiled = Compiled(base, variant, backend)
    try:
        with torch.inference_mode(), compiled.installed():
            t0 = time.perf_counter()
            tokens = run_images(base, labels, seeds)
            sync(base.device)
            out["on"]["first_pass_s"] = time.perf_counter() - t0
            out["on"]["tokens_equal_eager"] = all(torch.equal(a, b) for a, b in zip(reference, tokens, strict=True))
            alone = run_images(base, labels[:1], seeds[:1])
            out["on"]["bit_identical"] = all(torch.equal(a[0], b[0]) for a, b in zip(alone, tokens, strict=True))
    except Exception as exc:  # noqa: BLE001  # inductor raises many kinds; the JSON says which
        return {**out, "status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    for rnd in range(4):  # interleaved
        for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            if not box.fits(estimate * 1.5):
                break
            with torch.inference_mode(), (compiled.installed() if mode == "on" else nullcontext()):
                t0 = time.perf_counter()
                run_images(base, labels, seeds)
                sync(base.device)
                out[mode]["samples"].append(time.perf_counter() - t0)
    for mode in ("off", "on"):
        s = sorted(out[mode]["samples"])
        if s:
            out[mode].update(seconds=s[len(s) // 2], images_per_s=batch / s[len(s) // 2])
    if "seconds" in out["on"]:
        out["on"]["compile_s"] = max(0.0, out["on"]["first_pass_s"] - out["on"]["seconds"])
    if "seconds" in out["on"] and "seconds" in out["off"]:
        out["on_vs_off"] = out["on"]["seconds"] / out["off"]["seconds"]
    return {**out, "status": "ok"}

