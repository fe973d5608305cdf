"""Suite `gpu` (also scripts/bench-gpu.sh): VAR-d30, random weights, bf16, in one run of at most 8 minutes.

Sections, in order, each time-boxed (``amskv_tools.bench.gpu_sections``; what did not fit is recorded as
"skipped: time", and no unit of work starts after ``DEADLINE_S``):

- **max_batch**: per policy (vanilla, AMS-KV default), the KV manager sizes its pool from the free device
  memory; a whole batch of that size runs in it; then vanilla is asked for AMS-KV's largest batch (OOM?).
- **throughput**: images/s at batch 64/128/256 per policy, interleaved medians after a warm-up that also
  records the peak device memory (an OOM is recorded as "OOM", never a crash), and the self-attention time.
- **invariance**: ``batch_invariant`` off, auto and tiles: images/s, and image 0 bit-identical alone and in the
  batch ("unsupported" when the Engine has no such argument).
- **scheduling**: static against continuous scheduling (``amskv_tools.bench.scheduling``) on the same open-loop
  Poisson arrivals at half the measured capacity.
- **compile**: ``torch.compile`` (``compile_cpu.Compiled``) on and off through ``Engine.step``, its compile
  time, and whether tokens and batch invariance survive it. Last, since a compile cannot be interrupted.

A probe also records the dtype and element size of the cached K, for the engine's path (blocks cast to bf16)
and under autocast with fp32 weights. ``--tiny`` runs the same code on the CPU with a depth-2 model at batch 1
and 2; its JSON says the GPU figures are not measured.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from amskv.config import VAR_PRESETS
from amskv.kvcache.manager import MAX_IMAGES
from amskv.kvcache.policy import make_policy
from amskv.sampling import SamplingParams
from amskv_tools.bench.attention import policy_shapes, time_shapes
from amskv_tools.bench.common import GIB, Report, md_table, median, tiny_vae_config, tiny_var_config
from amskv_tools.bench.gpu_sections import (
    OOM_ERRORS,
    SKIPPED,
    Box,
    compile_section,
    engine_in_mode,
    invariance_section,
    max_batch_section,
    run_section,
)

# vanilla first, AMS-KV last: the max-batch section asks the first for the batch the last one held
POLICIES: tuple[tuple[str, str, dict], ...] = (("vanilla", "vanilla", {}), ("amskv default", "amskv", {}))
BATCHES = (64, 128, 256)
COMPILE_BATCH = INVARIANCE_BATCH = 64
# The blocks' dense modules only: their small graphs are shared by all 30 layers, while the whole transformer
# (compile_cpu's "forward") took 16-60 s to compile on the CPU at 2-4 layers and may not fit the box at 30.
COMPILE_VARIANT = "dense"
# No unit of work starts after this: scripts/bench-gpu.sh kills the run at 480 s, and one d30 generation at
# batch 256 may take tens of seconds.
DEADLINE_S = 400
# Each section's cap, in the order they run; together more than DEADLINE_S, since a section that ends early
# leaves its time to the rest, and the deadline caps every one.
SECTION_BUDGET_S = {"max_batch": 90, "throughput": 150, "invariance": 60, "scheduling": 60, "compile": 75}


def build_engine(var_cfg, vae_cfg, device: torch.device, dtype=torch.bfloat16):
    from amskv.engine import Engine
    from amskv.model.var import VAR
    from amskv.model.vqvae import VQVAE

    torch.manual_seed(0)
    with device:  # parameters are created (and randomly initialised) on the device: no 8 GB host copy
        var, vae = VAR(var_cfg).eval(), VQVAE(vae_cfg).eval()
    var.blocks.to(dtype)  # as Engine.load: blocks in bf16, embeddings/head/VQVAE in fp32
    return Engine(var, vae, make_policy("vanilla", var_cfg.patch_nums), dtype, device, name=f"var-d{var_cfg.depth}")


def cached_k_probe(engine, autocast: bool) -> dict:
    """dtype and element size of the K the cache stores, observed inside attention at batch 1."""
    seen: dict[str, Any] = {}

    def observer(layer, si, q, k_all, v_all, segments):
        seen.setdefault("k_dtype", str(k_all.dtype).replace("torch.", ""))
        seen.setdefault("k_element_size", k_all.element_size())
        seen.setdefault("q_dtype", str(q.dtype).replace("torch.", ""))

    params = SamplingParams(cfg=1.5, top_k=900, top_p=0.96)
    if autocast:  # the original VAR's way: fp32 weights, bf16 compute under autocast
        engine.var.blocks.float()
        try:
            with torch.autocast(engine.device.type, dtype=torch.bfloat16):
                engine.generate_tokens([0], [0], params, observer=observer)
        finally:
            engine.var.blocks.to(engine.dtype)
    else:
        engine.generate_tokens([0], [0], params, observer=observer)
    return {"mode": "autocast(bf16), fp32 weights" if autocast else "blocks cast to bf16 (Engine.load)", **seen}


def run_variant(engine: Any, batch: int, params: SamplingParams | None) -> dict:
    cuda = engine.device.type == "cuda"
    labels, seeds = [i % engine.num_classes for i in range(batch)], list(range(batch))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        res = engine.generate(labels, seeds, params)
    except OOM_ERRORS:
        if cuda:
            torch.cuda.empty_cache()
        return {"status": "OOM"}
    if cuda:
        torch.cuda.synchronize()
    return {"status": "ok", "seconds": time.perf_counter() - t0, "kv_allocated_bytes": res.kv_allocated_bytes,
            "kv_peak_stored_bytes": res.kv_peak_stored_bytes,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def attention_time(cfg: Any, name: str, args: dict, batch: int, device: torch.device, rounds: int) -> float | str:
    shapes = policy_shapes(cfg, name, args)
    try:
        times = time_shapes(set(shapes), 2 * batch, cfg.num_heads, cfg.head_dim, torch.bfloat16, device, rounds)
    except OOM_ERRORS:
        return "OOM"
    return sum(n * median(times[s]) for s, n in shapes.items())


def throughput_section(var_cfg: Any, engines: dict[str, Any], batches: Sequence[int], params: SamplingParams,
                       rounds: int, box: Box) -> dict:
    """images/s per (policy, batch): a warm-up that also measures the peak memory, then interleaved rounds."""
    variants = [(label, b) for b in batches for label in engines]
    results: dict[tuple[str, int], dict] = {v: {"status": SKIPPED, "samples": []} for v in variants}
    per_image_s = 0.0  # the slowest seconds per image so far: the estimate of the next run

    def fits(batch: int) -> bool:
        return box.fits(per_image_s * batch)

    with torch.inference_mode():
        for v in variants:  # warm-up, and the peak-memory measurement
            if fits(v[1]):
                results[v].update(run_variant(engines[v[0]], v[1], params))
                if results[v]["status"] == "ok":
                    per_image_s = max(per_image_s, results[v]["seconds"] / v[1])
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                if results[v]["status"] == "ok" and fits(v[1]):
                    out = run_variant(engines[v[0]], v[1], params)
                    if out["status"] == "ok":
                        results[v]["samples"].append(out["seconds"])
    rows = []
    for (label, batch), res in results.items():
        name, args = next((n, a) for lab, n, a in POLICIES if lab == label)
        row = {"policy": label, "batch": batch, "status": res["status"], "rounds": len(res["samples"])}
        if res["status"] == "ok":
            secs = median(res["samples"]) if res["samples"] else res["seconds"]
            row.update(images_per_s=batch / secs, seconds=secs, peak_memory_bytes=res["peak_memory_bytes"],
                       kv_allocated_bytes=res["kv_allocated_bytes"], kv_peak_stored_bytes=res["kv_peak_stored_bytes"])
        # the attention kernels alone take a fraction of a generation; 10 % of the box is kept for them
        row["attention_seconds"] = attention_time(var_cfg, name, args, batch, engines[label].device, rounds + 2) \
            if box.left() > 0.1 * box.budget_s else SKIPPED
        rows.append(row)
    return {"rows": rows}


def run_suite(tiny: bool = False, rounds: int | None = None, device: str = "auto",
              partial_json: str | Path | None = None) -> Report:
    """``partial_json``: rewritten after every section with what is done so far ("partial": true), so that a run
    the script's timeout kills (a compile that overran) still leaves its finished sections."""
    start = time.monotonic()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    batches: tuple[int, ...]
    if tiny:
        var_cfg = tiny_var_config()
        vae_cfg, batches = tiny_vae_config(var_cfg), (1, 2)
    else:
        var_cfg, vae_cfg, batches = VAR_PRESETS["d30"].var, VAR_PRESETS["d30"].vae, BATCHES
    rounds = rounds or (1 if tiny else 3)

    def budget(section: str) -> float:  # a section's cap, never past the suite's deadline
        return min(SECTION_BUDGET_S[section], DEADLINE_S - (time.monotonic() - start))

    base = build_engine(var_cfg, vae_cfg, dev)
    params = SamplingParams(cfg=1.5, top_k=900, top_p=0.96)
    # autocast runs the GEMMs in bf16 on fp32 weights: plain F.linear there, since the invariant forms were
    # chosen for the weights' dtype; the engine's own mode is put back after it
    probes = [cached_k_probe(base, autocast=False), cached_k_probe(engine_in_mode(base, "off"), autocast=True)]
    engine_in_mode(base)
    engines = {label: base.with_policy(name, args) for label, name, args in POLICIES}
    # The CPU has no device memory to run out of: its KV budget is a setting. At toy size it is set to hold
    # three AMS-KV images, so that the two policies' pools differ as they would on a GPU.
    cpu_budget = 3 * engines[POLICIES[-1][0]].kv_bytes_per_image()
    measured_gpu = dev.type == "cuda" and not tiny
    data: dict[str, Any] = {
        "model": f"d{var_cfg.depth}" + (" (tiny)" if tiny else ""), "device": str(dev),
        "gpu_figures": "measured" if measured_gpu else
        f"not measured: this run was on {dev.type}{' at toy size' if tiny else ''}, not a GPU",
        "dtype": "bf16", "weights": "random", "cached_k": probes, "deadline_s": DEADLINE_S}
    sections: dict[str, dict] = {}
    plan: list[tuple[str, Callable[[Box], dict]]] = [
        ("max_batch", lambda box: max_batch_section(base, POLICIES, params, 4 if tiny else MAX_IMAGES, cpu_budget,
                                                    box)),
        ("throughput", lambda box: throughput_section(var_cfg, engines, batches, params, rounds, box)),
        ("invariance", lambda box: invariance_section(base.with_policy(*POLICIES[-1][1:]),
                                                      batches[-1] if tiny else INVARIANCE_BATCH, params, box)),
        ("scheduling", lambda box: scheduling_section(base, sections["throughput"].get("rows", []), tiny, box)),
        ("compile", lambda box: compile_section(base, batches[-1] if tiny else COMPILE_BATCH, COMPILE_VARIANT,
                                                "aot_eager" if tiny else "inductor", box)),
    ]
    for name, section in plan:
        sections[name] = run_section(budget(name), section)
        if partial_json is not None:
            partial = {"suite": "gpu", "partial": True, **data, **sections, "wall_s": time.monotonic() - start}
            Path(partial_json).parent.mkdir(parents=True, exist_ok=True)
            Path(partial_json).write_text(json.dumps(partial, indent=1, default=str) + "\n")
    rows = sections["throughput"].get("rows", [])
    data.update(rows=rows, **sections, wall_s=time.monotonic() - start)
    return Report("gpu", data, _markdown(rows, probes, dev, data["gpu_figures"]) + _sections_markdown(sections), [], [])


def scheduling_section(base: Any, rows: list[dict], tiny: bool, box: Box) -> dict:
    """Static against continuous scheduling at half the whole-batch capacity the variants measured."""
    from amskv.kvcache.manager import KVCacheManager
    from amskv_tools.bench.scheduling import REQUEST_IMAGES, arrivals, run_segment, summarise

    measured = [r["images_per_s"] for r in rows if r["policy"] == "amskv default" and r["status"] == "ok"]
    if not measured:
        return {"status": "skipped: no capacity measured"}
    capacity, requests = max(measured), 3 if tiny else 24
    plan = arrivals(0.5 * capacity / (sum(REQUEST_IMAGES) / len(REQUEST_IMAGES)), requests, seed=5)
    # both replays run in real time: the arrivals' span each, and the warm-up's 3 small generations
    if not box.fits(2 * 1.5 * plan[-1][0] + 3 * 2 / capacity):
        return {"status": SKIPPED, "arrivals_span_s": plan[-1][0]}
    engine = base.with_policy("amskv-static")  # every layer planned demanding: the memory is known up front
    manager = KVCacheManager(engine, max_batch=2 if tiny else 64)
    manager.warm_up(SamplingParams(cfg=1.5, top_k=900, top_p=0.96))
    with torch.inference_mode():
        out = {mode: summarise([run_segment(engine, manager, mode, plan, seed=1)]) for mode in ("static", "continuous")}
    s, c = out["static"], out["continuous"]
    return {"status": "ok", "load": 0.5, "capacity_images_per_s": capacity, "requests": requests, **out,
            "ttfp_p50_ratio": c["ttfp_p50_s"] / s["ttfp_p50_s"],
            "latency_p90_ratio": c["latency_p90_s"] / s["latency_p90_s"],
            "images_per_s_ratio": c["images_per_s"] / s["images_per_s"]}


def _scheduling_markdown(sched: dict) -> str:
    if sched.get("status") != "ok":
        return f"\n\nScheduling: {sched.get('status')}."
    rows = [[mode, sched[mode]["latency_p50_s"], sched[mode]["latency_p90_s"], sched[mode]["ttfp_p50_s"],
             sched[mode]["images_per_s"], sched[mode]["mean_images_per_step"]] for mode in ("static", "continuous")]
    return ("\n\nScheduling at half the measured capacity (open-loop Poisson, same arrivals):\n\n"
            + md_table(["scheduler", "latency p50 s", "latency p90 s", "TTFP p50 s", "images/s", "images per step"],
                       rows))


def _fmt(value: Any, scale: float = 1.0) -> Any:
    return value if isinstance(value, str) or value is None else value / scale


def _markdown(rows: list[dict], probes: list[dict], dev: torch.device, label: str) -> str:
    table = md_table(["policy", "batch", "status", "images/s", "peak GiB", "KV GiB (allocated)", "attention s"],
                     [[r["policy"], r["batch"], r["status"], r.get("images_per_s", "-"),
                       _fmt(r.get("peak_memory_bytes"), GIB) or "-", _fmt(r.get("kv_allocated_bytes", 0), GIB),
                       r["attention_seconds"]] for r in rows])
    probe = md_table(["mode", "cached K dtype", "element size (bytes)"],
                     [[p["mode"], p.get("k_dtype"), p.get("k_element_size")] for p in probes])
    return (f"Device: {dev}. GPU figures: {label}. Random weights, interleaved medians after a warm-up.\n\n"
            f"{table}\n\n{probe}")


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _sections_markdown(sections: dict[str, dict]) -> str:
    timing = md_table(["section", "status", "budget s", "took s"],
                      [[name, sec.get("status"), sec.get("budget_s"), sec.get("section_s")]
                       for name, sec in sections.items()])
    parts = [f"\n\nSections (each time-boxed):\n\n{timing}"]
    mb = sections["max_batch"]
    if mb.get("policies"):
        parts.append("Largest batch the KV manager's pool holds:\n\n" + md_table(
            ["policy", "status", "pool images", "KV bytes per image", "activation bytes per image", "full batch"],
            [[label, r.get("status"), r.get("pool_images", "-"), r.get("bytes_per_image", "-"),
              r.get("activation_bytes_per_image", "-"), r.get("full_pool_batch", {}).get("status", "-")]
             for label, r in mb["policies"].items()]))
        if "first_at_last_max" in mb:
            f = mb["first_at_last_max"]
            parts.append(f"{f['policy']} at batch {f['batch']}: {f.get('status')}.")
    inv = sections["invariance"]
    if inv.get("modes"):
        parts.append("Batch invariance modes:\n\n" + md_table(
            ["mode", "status", "images/s", "image 0 bit-identical alone and in the batch", "build s"],
            [[m, r.get("status"), r.get("images_per_s", "-"), r.get("bit_identical", "-"), r.get("build_s") or "-"]
             for m, r in inv["modes"].items()]))
    comp = sections["compile"]
    if comp.get("status") == "ok":
        on = comp["on"]
        parts.append(f"Compile ({comp['variant']}, {comp['backend']}, batch {comp['batch']}): time on/off "
                     f"{_num(comp.get('on_vs_off'))}, compile {_num(on.get('compile_s'))} s, tokens equal to eager "
                     f"{on.get('tokens_equal_eager')}, image 0 bit-identical alone and in the batch "
                     f"{on.get('bit_identical')}.")
    else:
        parts.append(f"Compile: {comp.get('status')}.")
    return "\n\n".join(parts) + _scheduling_markdown(sections["scheduling"])
