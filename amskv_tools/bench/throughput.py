"""Suite `throughput`: images/s and KV memory against batch size per policy, under one fixed KV budget.

The demo model runs on the CPU (its bundled weights when present, else random weights of the same shape;
the report says which). A requested batch larger than the budget admits runs at the admissible size, as
the server would: a policy whose cache is larger stops growing earlier.
"""
from __future__ import annotations

import torch

from amskv_tools.bench.common import MIB, Plot, Report, demo_engine, interleaved, md_table, median
from amskv.memory import max_batch
from amskv.sampling import SamplingParams

POLICIES = (("vanilla", "vanilla", {}), ("full", "full", {}), ("amskv default", "amskv", {}),
            ("amskv aggressive", "amskv", {"preset": "aggressive"}))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FULL_ADMITS = 32  # the budget is fixed so that `full` admits this many images: it must bind inside the sweep


def budget_bytes(full_bytes_per_image: int, admits: int = FULL_ADMITS) -> int:
    """Half-way between ``admits`` and ``admits + 1`` images of `full`: it admits exactly ``admits``."""
    return admits * full_bytes_per_image + full_bytes_per_image // 2


def run_suite(tiny: bool = False, rounds: int | None = None) -> Report:
    base, source = demo_engine("full")
    engines = {label: base.with_policy(name, args) for label, name, args in POLICIES}
    budget = budget_bytes(engines["full"].kv_bytes_per_image(), 1 if tiny else FULL_ADMITS)
    batches = (1, 2) if tiny else BATCHES
    rounds = rounds or (1 if tiny else 3)
    params = SamplingParams(cfg=4.0, top_k=0 if tiny else 900, top_p=0.95)
    rows: list[dict] = []
    last: dict[str, tuple[int, float]] = {}  # policy -> (batch, seconds) last measured
    for batch in batches:
        plan = {label: min(batch, max_batch(budget, e.kv_bytes_per_image())) for label, e in engines.items()}
        todo = {label: n for label, n in plan.items() if n > 0 and last.get(label, (0, 0))[0] != n}

        def call(engine, n):
            labels = [i % engine.num_classes for i in range(n)]
            return lambda: engine.generate(labels, list(range(n)), params)

        samples = {}
        if todo:  # every policy already capped below this batch: nothing new to time
            with torch.inference_mode():
                samples = interleaved({label: call(engines[label], n) for label, n in todo.items()}, rounds,
                                      warmup=1 if batch == batches[0] else 0)
        for label, n in plan.items():
            if label in todo:
                last[label] = (n, median(samples[label]))
            n_eff, seconds = last.get(label, (0, float("nan")))
            kv = engines[label].memory(n_eff).allocated_bytes if n_eff else 0
            rows.append({"policy": label, "requested_batch": batch, "batch": n_eff, "capped": n_eff < batch,
                         "seconds": seconds, "images_per_s": n_eff / seconds if n_eff else 0.0, "kv_bytes": kv,
                         "remeasured": label in todo})
    stops = {label: max(r["batch"] for r in rows if r["policy"] == label) for label in engines}
    md = [f"Model: {base.model_name} ({source}), {base.dtype} on CPU, 1 thread, CFG, decoder included. "
          f"KV budget: {budget / MIB:.2f} MiB (fixed so that `full` admits {1 if tiny else FULL_ADMITS} images).", "",
          md_table(["requested batch", "policy", "run at batch", "images/s", "KV MiB (allocated)"],
                   [[r["requested_batch"], r["policy"], r["batch"], r["images_per_s"], r["kv_bytes"] / MIB]
                    for r in rows]), "",
          md_table(["policy", "largest batch under the budget", "images/s there"],
                   [[label, stops[label], max(r["images_per_s"] for r in rows if r["policy"] == label)]
                    for label in engines])]
    notes = [f"Weights: {source}. Random weights generate noise images but cost the same compute; "
             "the throughput figures are valid for the architecture, not for image quality.",
             "Memory is the KV cache allocated for the batch (cache tensors, measured = plan_kv arithmetic); "
             "CPU process RSS is monotone and cannot be attributed to one interleaved variant.",
             f"{rounds} interleaved round(s) per batch size; medians. A capped policy reuses its last measurement."]
    plots = [Plot("images_per_s", lambda ax: _plot(ax, rows, "images_per_s", "images/s"), "Images/s under a fixed KV budget"),
             Plot("kv_memory", lambda ax: _plot(ax, rows, "kv_bytes", "KV MiB", budget), "KV allocated per batch")]
    data = {"model": base.model_name, "weights": source, "dtype": str(base.dtype).replace("torch.", ""),
            "budget_bytes": budget, "rows": rows, "largest_batch": stops}
    return Report("throughput", data, "\n".join(md), plots, notes)


def _plot(ax, rows, key, ylabel, budget=None) -> None:
    for label in dict.fromkeys(r["policy"] for r in rows):
        sel = [r for r in rows if r["policy"] == label]
        ys = [r[key] / (MIB if key == "kv_bytes" else 1) for r in sel]
        ax.plot([r["requested_batch"] for r in sel], ys, marker="o", label=label)
    if budget is not None:
        ax.axhline(budget / MIB, color="grey", ls="--", lw=1, label="budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requested batch")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
