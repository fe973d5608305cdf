"""Images/s on the CPU for the golden tiny model (depth 2, 256 px) at batch 1, 8 and 32.

    python amskv_tools/bench/engine_cpu.py [--golden tests/golden] [--threads 1] [--repeats 3] [--json OUT]

Batches are interleaved over the repeats and the median is reported, since this machine is shared.
Prints a Markdown table and one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from amskv.engine import Engine
from amskv.sampling import SamplingParams


def main() -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", default=str(repo / "tests" / "golden"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy", default="full")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    golden = Path(args.golden)
    engine = Engine.load(golden / "tiny_var.pth", golden / "vae.pth", policy=args.policy)
    params = SamplingParams(cfg=4.0, top_k=900, top_p=0.95)
    engine.generate([0], [0], params)  # warm-up
    times: dict[int, list[float]] = {b: [] for b in args.batches}
    ar: dict[int, list[float]] = {b: [] for b in args.batches}
    for _ in range(args.repeats):
        for b in args.batches:  # interleaved
            t0 = time.perf_counter()
            res = engine.generate(list(range(b)), list(range(b)), params)
            times[b].append(time.perf_counter() - t0)
            ar[b].append(res.seconds_ar)
    rows = []
    for b in args.batches:
        med = statistics.median(times[b])
        rows.append({"batch": b, "seconds_median": med, "images_per_s": b / med,
                     "ar_seconds_median": statistics.median(ar[b]), "runs": times[b]})
    print("| batch | images/s | s per batch (median) | of which VAR sampling |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['images_per_s']:.2f} | {r['seconds_median']:.3f} | {r['ar_seconds_median']:.3f} |")
    out = {"model": engine.model_name, "policy": args.policy, "threads": args.threads, "repeats": args.repeats,
           "torch": torch.__version__, "results": rows}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
