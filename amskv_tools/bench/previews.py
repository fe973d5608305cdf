"""Suite `previews`: what streamed per-scale previews cost a batch (POST /v1/generate with stream: true).

One engine call of B images, of which 0, 1, B/2 or all B rows stream previews (the running f_hat decoded
after every scale, as the server does for a streamed request). Images/s counts the whole batch; the
preview cost per streamed image is the extra time divided by the streamed rows. Rows that do not stream
cost nothing extra: the engine decodes only the rows that asked (amskv/engine.py, previews=).
"""
from __future__ import annotations

import torch

from amskv_tools.bench.common import Report, demo_engine, interleaved, md_table, median, spread
from amskv.kvcache.policy import DEFAULT_POLICY
from amskv.sampling import SamplingParams

BATCHES = (8, 32)


def run_suite(tiny: bool = False, rounds: int | None = None) -> Report:
    engine, source = demo_engine(DEFAULT_POLICY)
    scales = engine.config.num_scales
    batches = (2,) if tiny else BATCHES
    rounds = rounds or (1 if tiny else 7)
    params = SamplingParams(cfg=4.0, top_k=0 if tiny else 900, top_p=0.95)
    every_scale = range(scales)
    previews_made = []

    def call(batch: int, streamed: int):
        labels, seeds = [i % engine.num_classes for i in range(batch)], list(range(batch))
        previews = [every_scale if i < streamed else () for i in range(batch)]
        return lambda: engine.generate(labels, seeds, params, previews=previews,
                                       on_preview=lambda si, rows, images: previews_made.append(len(rows)))

    rows: list[dict] = []
    for batch in batches:
        mixes = dict.fromkeys((0, 1, batch // 2, batch))
        with torch.inference_mode():
            samples = interleaved({streamed: call(batch, streamed) for streamed in mixes}, rounds, warmup=1)
        base = median(samples[0])
        for streamed in mixes:
            seconds = median(samples[streamed])
            rows.append({"batch": batch, "streamed_rows": streamed, "seconds": seconds,
                         "spread": spread(samples[streamed]), "images_per_s": batch / seconds,
                         "relative_throughput": base / seconds,
                         "preview_ms_per_streamed_image": (seconds - base) / streamed * 1000 if streamed else 0.0})
    md = [f"Model: {engine.model_name} ({source}), policy {engine.policy_name}, {engine.resolution}x{engine.resolution}"
          f" images, {scales} scales, fp32 on CPU, 1 thread, CFG, decoder included. A streamed row gets one "
          f"preview per scale ({scales}), decoded at the model's resolution.", "",
          md_table(["batch", "streamed rows", "s per batch", "images/s", "vs no previews",
                    "preview ms per streamed image"],
                   [[r["batch"], r["streamed_rows"], r["seconds"], r["images_per_s"], r["relative_throughput"],
                     r["preview_ms_per_streamed_image"]] for r in rows])]
    notes = [f"{rounds} interleaved round(s) per mix; medians (spread = half the IQR / median, see JSON).",
             "Measured on the engine (no HTTP): the server adds PNG encoding and SSE framing per preview "
             "on the event loop, outside the inference thread.",
             f"{sum(previews_made)} preview images were decoded in all."]
    data = {"model": engine.model_name, "weights": source, "policy": engine.policy_name, "scales": scales,
            "rows": rows}
    return Report("previews", data, "\n".join(md), [], notes)
