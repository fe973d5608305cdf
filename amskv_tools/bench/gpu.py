"""Suite `gpu` (also scripts/bench-gpu.sh): VAR-d30, random weights, bf16, batch 64/128/256, vanilla against amskv.

Per variant: peak device memory (torch.cuda.max_memory_allocated), images/s after a warm-up, the
self-attention time over the variant's (queries, keys) shapes, and the KV bytes. Variants are interleaved
and timed by medians; an OOM is recorded as "OOM" for that variant, never a crash. A probe records the dtype
and element size of the cached K both for the engine's path (blocks cast to bf16) and under autocast with
fp32 weights. Then, while time remains, static against continuous scheduling (``amskv_tools.bench.scheduling``):
the same open-loop Poisson arrivals at half the measured whole-batch capacity, replayed against both.
``--tiny`` runs the same code on the CPU with a depth-2 model at batch 1 and 2.
"""
from __future__ import annotations

import time

import torch

from amskv_tools.bench.attention import policy_shapes, time_shapes
from amskv_tools.bench.common import GIB, Report, md_table, median, tiny_vae_config, tiny_var_config
from amskv.config import VAR_PRESETS
from amskv.kvcache.policy import make_policy
from amskv.sampling import SamplingParams

POLICIES = (("vanilla", "vanilla", {}), ("amskv default", "amskv", {}))
BATCHES = (64, 128, 256)
DEADLINE_S = 7 * 60  # stop starting new rounds after this: the script must end within 8 minutes
OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)


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
    seen = {}

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


def run_variant(engine, batch: int, params: SamplingParams) -> dict:
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


def attention_time(cfg, name: str, args: dict, batch: int, device: torch.device, rounds: int) -> float | str:
    shapes = policy_shapes(cfg, name, args)
    try:
        times = time_shapes(set(shapes), 2 * batch, cfg.num_heads, cfg.head_dim, torch.bfloat16, device, rounds)
    except OOM_ERRORS:
        return "OOM"
    return sum(n * median(times[s]) for s, n in shapes.items())


def run_suite(tiny: bool = False, rounds: int | None = None, device: str = "auto") -> Report:
    start = time.monotonic()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if tiny:
        var_cfg = tiny_var_config()
        vae_cfg, batches = tiny_vae_config(var_cfg), (1, 2)
    else:
        var_cfg, vae_cfg, batches = VAR_PRESETS["d30"].var, VAR_PRESETS["d30"].vae, BATCHES
    rounds = rounds or (1 if tiny else 3)
    base = build_engine(var_cfg, vae_cfg, dev)
    engines = {label: base.with_policy(name, args) for label, name, args in POLICIES}
    params = SamplingParams(cfg=1.5, top_k=900, top_p=0.96)
    probes = [cached_k_probe(base, autocast=False), cached_k_probe(base, autocast=True)]
    variants = [(label, b) for b in batches for label in engines]
    results = {v: {"samples": []} for v in variants}
    with torch.inference_mode():
        for v in variants:  # warm-up, and the peak-memory measurement
            results[v].update(run_variant(engines[v[0]], v[1], params))
        for r in range(rounds):
            if time.monotonic() - start > DEADLINE_S:
                break
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                if results[v]["status"] == "ok":
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
        row["attention_seconds"] = attention_time(var_cfg, name, args, batch, dev, rounds + 2) \
            if time.monotonic() - start < DEADLINE_S else "skipped (deadline)"
        rows.append(row)
    scheduling = scheduling_section(base, rows, tiny) if time.monotonic() - start < DEADLINE_S - 60 else \
        {"status": "skipped (deadline)"}
    return Report("gpu", {"model": f"d{var_cfg.depth}" + (" (tiny)" if tiny else ""), "device": str(dev),
                          "dtype": "bf16", "weights": "random", "rows": rows, "cached_k": probes,
                          "scheduling": scheduling, "wall_s": time.monotonic() - start},
                  _markdown(rows, probes, dev) + _scheduling_markdown(scheduling), [], [])


def scheduling_section(base, rows: list[dict], tiny: bool) -> dict:
    """Static against continuous scheduling at half the whole-batch capacity the variants measured."""
    from amskv_tools.bench.scheduling import REQUEST_IMAGES, arrivals, run_segment, summarise
    from amskv.kvcache.manager import KVCacheManager

    measured = [r["images_per_s"] for r in rows if r["policy"] == "amskv default" and r["status"] == "ok"]
    if not measured:
        return {"status": "skipped (no capacity measured)"}
    engine = base.with_policy("amskv-static")  # every layer planned demanding: the memory is known up front
    manager = KVCacheManager(engine, max_batch=2 if tiny else 64)
    manager.warm_up(SamplingParams(cfg=1.5, top_k=900, top_p=0.96))
    capacity, requests = max(measured), 3 if tiny else 24
    plan = arrivals(0.5 * capacity / (sum(REQUEST_IMAGES) / len(REQUEST_IMAGES)), requests, seed=5)
    with torch.inference_mode():
        out = {mode: summarise([run_segment(engine, manager, mode, plan, seed=1)]) for mode in ("static", "continuous")}
    s, c = out["static"], out["continuous"]
    return {"status": "ok", "load": 0.5, "capacity_images_per_s": capacity, "requests": requests, **out,
            "ttfp_p50_ratio": c["ttfp_p50_s"] / s["ttfp_p50_s"], "latency_p90_ratio": c["latency_p90_s"] / s["latency_p90_s"],
            "images_per_s_ratio": c["images_per_s"] / s["images_per_s"]}


def _scheduling_markdown(sched: dict) -> str:
    if sched.get("status") != "ok":
        return f"\n\nScheduling: {sched.get('status')}."
    rows = [[mode, sched[mode]["latency_p50_s"], sched[mode]["latency_p90_s"], sched[mode]["ttfp_p50_s"],
             sched[mode]["images_per_s"], sched[mode]["mean_images_per_step"]] for mode in ("static", "continuous")]
    return ("\n\nScheduling at half the measured capacity (open-loop Poisson, same arrivals):\n\n"
            + md_table(["scheduler", "latency p50 s", "latency p90 s", "TTFP p50 s", "images/s", "images per step"], rows))


def _fmt(value, scale=1.0):
    return value if isinstance(value, str) or value is None else value / scale


def _markdown(rows, probes, dev) -> str:
    table = md_table(["policy", "batch", "status", "images/s", "peak GiB", "KV GiB (allocated)", "attention s"],
                     [[r["policy"], r["batch"], r["status"], r.get("images_per_s", "-"),
                       _fmt(r.get("peak_memory_bytes"), GIB) or "-", _fmt(r.get("kv_allocated_bytes", 0), GIB),
                       r["attention_seconds"]] for r in rows])
    probe = md_table(["mode", "cached K dtype", "element size (bytes)"],
                     [[p["mode"], p.get("k_dtype"), p.get("k_element_size")] for p in probes])
    return f"Device: {dev}. Random weights, interleaved medians after a warm-up.\n\n{table}\n\n{probe}"
