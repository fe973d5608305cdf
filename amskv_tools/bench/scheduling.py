"""Suite `scheduling`: continuous batching at scale boundaries against whole batches, under open-loop load.

For each bundled model, the static scheduler's capacity is measured first: a backlog of requests served by
whole batches (``Scheduler(mode="static")``), images/s. Then open-loop Poisson arrivals at 30, 60 and 90 %
(and 50 %) of that capacity are replayed against both schedulers in alternating segments: every segment
draws one arrival sequence and runs it static then continuous, or continuous then static (the order
alternates), so both see the same requests on the same machine state. Requests ask for 1, 2 or 4 images
and a preview after scale 0, as a streamed request does; they join the queue at their arrival time and are
admitted first come, first served, image by image as slots free (the server's queue, without HTTP).

Reported per model, load and scheduler: latency p50/p90/p99 (arrival to the last image), time to first
preview (arrival to the scale-0 preview), images/s (images over the segment's span), mean images per step,
and the continuous / static ratios. Everything is measured in-process on this machine, one torch thread.
"""
from __future__ import annotations

import random
import time

from amskv_tools.bench.common import Plot, Report, md_table, median
from amskv.kvcache.manager import KVCacheManager
from amskv.sampling import SamplingParams
from amskv.scheduler import ImageSpec, Scheduler

LOADS = (0.3, 0.5, 0.6, 0.9)
REQUEST_IMAGES = (1, 2, 4)
PARAMS = SamplingParams(cfg=4.0, top_k=900, top_p=0.95)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def arrivals(rate_rps: float, requests: int, seed: int) -> list[tuple[float, int]]:
    """(arrival offset in s, images) of an open-loop Poisson process."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate_rps)
        out.append((t, rng.choice(REQUEST_IMAGES)))
    return out


def run_segment(engine, manager: KVCacheManager, mode: str, plan: list[tuple[float, int]], seed: int) -> dict:
    """Replays ``plan`` in real time against one scheduler; returns per-request latencies and step stats."""
    scheduler = Scheduler(engine, manager, mode=mode)
    n = len(plan)
    arrived_at, first_preview, done_at, left = [0.0] * n, [None] * n, [0.0] * n, [k for _, k in plan]
    queue: list[ImageSpec] = []
    rows: list[int] = []
    images = 0
    began, nxt = time.perf_counter(), 0
    while nxt < n or queue or scheduler.cohorts:
        now = time.perf_counter() - began
        while nxt < n and plan[nxt][0] <= now:
            arrived_at[nxt] = plan[nxt][0]
            queue += [ImageSpec(label=(nxt + i) % engine.num_classes, seed=seed + 16 * nxt + i, params=PARAMS,
                                previews=frozenset({0}) if i == 0 else frozenset(), tag=(nxt, i))
                      for i in range(plan[nxt][1])]
            nxt += 1
        room = scheduler.room()
        if queue and room:
            started = scheduler.admit(queue[:room])
            queue = queue[started:]
        if not scheduler.cohorts:
            time.sleep(max(0.0, min(0.05, plan[nxt][0] - now)) if nxt < n else 0.0)
            continue
        outcome = scheduler.step()
        stamp = time.perf_counter() - began
        rows.append(outcome.rows)
        for spec, _scale, _image in outcome.previews:
            r = spec.tag[0]
            first_preview[r] = stamp if first_preview[r] is None else first_preview[r]
        for spec, _image in outcome.images:
            r = spec.tag[0]
            left[r] -= 1
            images += 1
            if left[r] == 0:
                done_at[r] = stamp
    latency = [d - a for d, a in zip(done_at, arrived_at)]
    ttfp = [p - a for p, a in zip(first_preview, arrived_at) if p is not None]
    span = max(done_at) - arrived_at[0]
    return {"latency": latency, "ttfp": ttfp, "images": images, "span_s": span, "rows": rows}


def static_capacity(engine, manager: KVCacheManager, requests: int, seed: int) -> float:
    """Images/s of whole batches on a backlog (every request queued at once)."""
    backlog = [(0.0, REQUEST_IMAGES[i % len(REQUEST_IMAGES)]) for i in range(requests)]
    seg = run_segment(engine, manager, "static", backlog, seed)
    return seg["images"] / seg["span_s"]


def summarise(segments: list[dict]) -> dict:
    latency = [x for s in segments for x in s["latency"]]
    ttfp = [x for s in segments for x in s["ttfp"]]
    rows = [x for s in segments for x in s["rows"]]
    return {"requests": len(latency), "latency_p50_s": percentile(latency, 0.5),
            "latency_p90_s": percentile(latency, 0.9), "latency_p99_s": percentile(latency, 0.99),
            "ttfp_p50_s": percentile(ttfp, 0.5), "ttfp_p90_s": percentile(ttfp, 0.9),
            "images_per_s": sum(s["images"] for s in segments) / sum(s["span_s"] for s in segments),
            "mean_images_per_step": sum(rows) / len(rows) if rows else 0.0}


def bench_model(model: str, *, requests: int, segments: int, loads: tuple[float, ...], max_batch: int) -> dict:
    from amskv.engine import Engine

    engine = Engine.load(model=model)
    manager = KVCacheManager(engine, max_batch=max_batch)
    manager.warm_up(PARAMS)
    mean_images = sum(REQUEST_IMAGES) / len(REQUEST_IMAGES)
    capacity = median([static_capacity(engine, manager, requests, 7 + k) for k in range(2)])
    rows = []
    for load in loads:
        rate = load * capacity / mean_images
        runs: dict[str, list[dict]] = {"static": [], "continuous": []}
        for k in range(segments):
            plan = arrivals(rate, requests, seed=1000 * k + int(load * 100))
            order = ("static", "continuous") if k % 2 == 0 else ("continuous", "static")
            for mode in order:
                runs[mode].append(run_segment(engine, manager, mode, plan, seed=k))
        summary = {mode: summarise(segs) for mode, segs in runs.items()}
        s, c = summary["static"], summary["continuous"]
        rows.append({"model": model, "load": load, "offered_images_per_s": load * capacity, **{
            f"{mode}_{key}": value for mode, values in summary.items() for key, value in values.items()},
            "ttfp_p50_ratio": c["ttfp_p50_s"] / s["ttfp_p50_s"], "latency_p90_ratio": c["latency_p90_s"] / s["latency_p90_s"],
            "latency_p50_ratio": c["latency_p50_s"] / s["latency_p50_s"],
            "images_per_s_ratio": c["images_per_s"] / s["images_per_s"]})
    return {"model": model, "engine": engine.model_name, "policy": engine.policy_name, "scales": engine.config.num_scales,
            "static_capacity_images_per_s": capacity, "rows": rows}


def run_suite(tiny: bool = False, rounds: int | None = None) -> Report:
    if tiny:
        models = [bench_model("demo", requests=6, segments=rounds or 2, loads=(0.5,), max_batch=8)]
    else:
        models = [bench_model("demo", requests=120, segments=rounds or 4, loads=LOADS, max_batch=256),
                  bench_model("mnist64", requests=40, segments=rounds or 2, loads=LOADS, max_batch=256)]
    rows = [r for m in models for r in m["rows"]]
    md = ["Open-loop Poisson arrivals (1, 2 or 4 images per request, a scale-0 preview each), replayed in-process "
          "against whole batches (static) and scale-boundary scheduling (continuous) in alternating segments on "
          "the same arrivals; 1 torch thread, fp32 on this CPU, policy amskv-static. Load is a fraction of the "
          "measured static capacity. Latency: arrival to the last image; TTFP: arrival to the first preview.", "",
          md_table(["model", "load", "static p50 / p90 / p99 s", "continuous p50 / p90 / p99 s",
                    "TTFP p50 s static / cont.", "TTFP p50 ratio", "p90 ratio", "images/s static / cont.",
                    "images/s ratio", "images per step static / cont."],
                   [[r["model"], r["load"],
                     f"{r['static_latency_p50_s']:.2f} / {r['static_latency_p90_s']:.2f} / {r['static_latency_p99_s']:.2f}",
                     f"{r['continuous_latency_p50_s']:.2f} / {r['continuous_latency_p90_s']:.2f} / "
                     f"{r['continuous_latency_p99_s']:.2f}",
                     f"{r['static_ttfp_p50_s']:.3f} / {r['continuous_ttfp_p50_s']:.3f}", r["ttfp_p50_ratio"],
                     r["latency_p90_ratio"], f"{r['static_images_per_s']:.1f} / {r['continuous_images_per_s']:.1f}",
                     r["images_per_s_ratio"],
                     f"{r['static_mean_images_per_step']:.1f} / {r['continuous_mean_images_per_step']:.1f}"]
                    for r in rows])]
    notes = [f"{m['model']}: static capacity {m['static_capacity_images_per_s']:.1f} images/s (backlog, whole batches)"
             for m in models]

    def draw(ax):
        for m in models:
            for mode, style in (("static", "--"), ("continuous", "-")):
                pts = m["rows"]
                ax.plot([r["load"] for r in pts], [r[f"{mode}_latency_p90_s"] for r in pts], style, marker="o",
                        label=f"{m['model']} {mode} p90")
        ax.set_xlabel("offered load (fraction of static capacity)")
        ax.set_ylabel("latency p90 (s)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)

    return Report("scheduling", {"models": models}, "\n".join(md), [Plot("latency", draw, "latency against load")],
                  notes)
