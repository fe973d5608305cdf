"""`amskv analyze`: attention density, inter-scale key similarity and kept scales, as JSON and PNG heatmaps.

With ``--calibrate PROFILE.json`` it also writes the static per-layer profile that ``amskv-static`` reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from amskv_tools.commands.common import add_model_arguments

HELP = "attention density, inter-scale key similarity and kept scales (JSON + PNG); --calibrate writes a profile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=32, help="images to analyse")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i; labels are drawn from seed")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--out", required=True, help="output directory for analysis.json and the heatmaps")
    parser.add_argument("--calibrate", metavar="PROFILE.json", help="write the amskv-static calibration profile")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    thr = parser.add_mutually_exclusive_group()
    thr.add_argument("--theta", type=float, help="similarity threshold (default: the AMS-KV policy's theta)")
    thr.add_argument("--target-fraction", type=float, help="choose theta so this fraction of layers is demanding")
    # The online AMS-KV policy: its key-similarity test is what --calibrate turns into a static profile.
    add_model_arguments(parser, default_policy="amskv")


def sample_labels(n: int, seed: int, num_classes: int) -> list[int]:
    import torch

    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def calibration_policy(engine):
    """The AMS-KV parameters whose test scales calibrate the layers: the chosen AMS-KV policy's, else the preset's."""
    from amskv.kvcache.policy import AMSKVPolicy, make_policy

    if isinstance(engine.policy, AMSKVPolicy):
        return engine.policy
    return make_policy("amskv", engine.config.patch_nums, {})


def run(args: argparse.Namespace) -> int:
    from amskv.analysis import analyze, calibrate, write_heatmaps
    from amskv_tools.commands.common import load_engine, parse_policy_args
    from amskv.kvcache.profile import check_profile_depth, write_profile
    from amskv.model.loading import CheckpointError
    from amskv.sampling import SamplingParams
    from tqdm import tqdm

    if args.n < 1 or args.batch < 1 or args.seed < 0 or args.cfg < 0:
        print("error: need --n >= 1, --batch >= 1, --seed >= 0 and --cfg >= 0", file=sys.stderr)
        return 2
    if args.target_fraction is not None and not 0 <= args.target_fraction <= 1:
        print("error: --target-fraction must be in [0, 1]", file=sys.stderr)
        return 2
    try:
        engine = load_engine(args)
        check_profile_depth(engine.policy, parse_policy_args(args.policy_arg), engine.config.depth)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = sample_labels(args.n, args.seed, engine.num_classes)
    seeds = [args.seed + i for i in range(args.n)]
    # each batch runs twice (under full with the observer, then under the policy): the bar counts images
    with tqdm(total=args.n, desc=f"analyze {engine.model_name}", unit="img", file=sys.stderr,
              disable=args.no_progress) as bar:
        result = analyze(engine, labels, seeds, SamplingParams(cfg=args.cfg), args.batch, progress=bar.update)
    profile = calibrate(result.similarity, engine.config.depth,
                        calibration_policy(engine),
                        engine.config.patch_nums, args.theta, args.target_fraction, engine.model_name, args.n)
    out = Path(args.out)
    images = write_heatmaps(result, out, profile)
    report = result.to_dict()
    report.update({"labels": labels, "seeds": seeds, "cfg": args.cfg, "calibration": profile.to_dict(),
                   "images": [str(p) for p in images]})
    if args.calibrate:
        report["profile"] = str(write_profile(args.calibrate, profile))
    (out / "analysis.json").write_text(json.dumps(report) + "\n")
    print(json.dumps({"model": engine.model_name, "policy": result.policy, "samples": args.n,
                      "json": str(out / "analysis.json"), "images": report["images"],
                      "theta": profile.theta, "demanding_layers": [i for i, d in enumerate(profile.demanding) if d],
                      "fraction": profile.fraction, "profile": report.get("profile")}))
    return 0
