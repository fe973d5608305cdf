"""`amskv eval-quality`: accuracy, FD, fidelity to `full` and KV bytes of a policy on the demo model."""
from __future__ import annotations

import argparse
import json
import sys

from amskv_tools.commands.common import add_model_arguments, load_engine

HELP = "score a KV policy's images on the demo model (accuracy, FD, fidelity to full, KV bytes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1000, help="images (labels cycle over the classes)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--cfg", type=float, action="append", default=None,
                        help="guidance scale (1 separates policies best); default 3, and 3 then 1 for --sweep; "
                             "repeatable for --sweep")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sweep", metavar="OUT.json",
                        help="instead of one policy, run the comparison of the model's layout (docs/demo-model.md, "
                             "docs/mnist64-sweep.md) at each --cfg")
    parser.add_argument("--profile", help="calibration profile for the sweep's amskv-static rows "
                                          "(default: the bundled model's shipped profile)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from amskv_tools.demo.quality import evaluate

    engine = load_engine(args)
    if engine.channels != 1 or engine.num_classes != 10:
        print("eval-quality scores MNIST digits: use the demo model (or another 10-class grayscale model)")
        return 2
    if args.sweep:
        from pathlib import Path

        from amskv_tools.demo.sweep import sweep
        from amskv.engine import bundled_profile

        profile = args.profile or (bundled_profile(args.model or "demo") if not args.var else None)
        cfgs = tuple(args.cfg or (3.0, 1.0))
        rows = sweep(engine, args.n, args.seed, cfgs, profile)
        Path(args.sweep).write_text(json.dumps({"model": engine.model_name, "n": args.n, "seed": args.seed,
                                                "cfgs": list(cfgs), "profile": str(profile) if profile else None,
                                                "rows": rows}, indent=1))
        return 0
    if args.cfg and len(args.cfg) > 1:
        print("error: one --cfg without --sweep", file=sys.stderr)
        return 2
    report, _ = evaluate(engine, n=args.n, seed=args.seed, cfg=(args.cfg or [3.0])[0],
                         reuse_reference=engine.policy.name == "full")  # `full` is its own reference
    data = report.to_dict()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    ta = data["token_agreement"]
    print(f"policy            {data['policy']}")
    print(f"images            {data['n']} (seed {data['seed']}, cfg {data['cfg']})")
    print(f"accuracy          {data['accuracy']:.4f}")
    print(f"FD                {data['fd']:.3f}")
    print(f"token agreement   {ta['overall']:.4f}  per scale {[round(x, 3) for x in ta['per_scale']]}")
    psnr_text = "identical" if data["psnr_vs_full"] is None else f"{data['psnr_vs_full']:.2f} dB"
    print(f"PSNR vs full      {psnr_text}")
    print(f"KV bytes/image    {data['kv_bytes_per_image']} allocated, {data['kv_peak_stored_bytes_per_image']} "
          f"stored ({data['stored_fraction_of_vanilla']:.1%} of vanilla)")
    return 0
