"""Cost of batch invariance on the CPU: the sampler's time with the fixed-tile GEMMs and fixed-group
convolutions (amskv/model/invariant.py, what the engine runs) against plain F.linear / conv calls.

    python amskv_tools/bench/invariance_cpu.py [--threads 1] [--repeats 5] [--json OUT]

The two variants are interleaved on the same engine and the medians compared, since this machine is shared.
Prints a Markdown table and one JSON object. Models: the bundled demo (batch 32) and the golden tiny model
(256 px, batch 8).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from amskv.engine import Engine
from amskv.model.invariant import set_batch_invariant
from amskv.sampling import SamplingParams


def measure(engine: Engine, labels: list[int], repeats: int) -> dict:
    seeds = list(range(len(labels)))
    params = SamplingParams(cfg=4.0, top_k=0, top_p=0.95)
    engine.generate(labels[:2], seeds[:2], params)  # warm-up
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for invariant in (True, False):  # interleaved
            set_batch_invariant(engine.var, invariant)
            set_batch_invariant(engine.vae, invariant)
            seconds[invariant].append(engine.generate(labels, seeds, params).seconds_ar)
    set_batch_invariant(engine.var, True)
    set_batch_invariant(engine.vae, True)
    inv, plain = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {"batch": len(labels), "invariant_s": inv, "plain_s": plain, "ratio": inv / plain,
            "runs": {"invariant": seconds[True], "plain": seconds[False]}}


def main() -> int:
    repo = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    golden = repo / "tests" / "golden"
    rows = {
        "demo": measure(Engine.load(policy="full"), [i % 10 for i in range(32)], args.repeats),
        "golden-tiny": measure(Engine.load(golden / "tiny_var.pth", golden / "vae.pth", policy="full"),
                               [207] * 8, args.repeats),
    }
    print("| model | batch | sampler s, invariant (median) | plain | ratio |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['batch']} | {r['invariant_s']:.3f} | {r['plain_s']:.3f} | {r['ratio']:.2f} |")
    data = {"threads": args.threads, "repeats": args.repeats, "rows": rows}
    print(json.dumps(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
