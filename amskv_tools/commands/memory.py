"""`amskv memory`: exact KV-cache bytes of a policy, per image and per batch, without running the model.

The figures come from ``amskv.memory`` (the policy replayed over token counts), so they equal what the
storage allocates in a real generation. A checkpoint path is read for its tensor shapes only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from amskv.kvcache.policy import DEFAULT_POLICY, POLICY_NAMES

HELP = "KV-cache memory of a policy: bytes per image, reduction vs vanilla/full, max batch for a budget"
GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="d30",
                        help="preset (d16, d20, d24, d30, d36, demo, mnist64) or a VAR checkpoint path; "
                             "a preset needs no weights")
    parser.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICY_NAMES,
                        help="KV cache policy (amskv-static without a profile treats every layer as demanding; "
                             "a bundled --model uses its own profile)")
    parser.add_argument("--policy-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="policy parameter, repeatable (e.g. preset=aggressive, c_min=100, profile=FILE)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"), help="KV dtype")
    parser.add_argument("--budget-gib", type=float, default=None, help="KV memory budget in GiB: report max batch")
    parser.add_argument("--demanding-fraction", type=float, default=None, metavar="F",
                        help="amskv/amskv-static: the memory when this share of the layers (0-1) is cache-demanding, "
                             "round(F x depth) layers; the real share is a property of each checkpoint's calibration")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def resolve_model(model: str):
    """(name, VARConfig) for a preset name or a checkpoint path; the checkpoint is read for shapes only."""
    from amskv.config import VAR_PRESETS
    from amskv.model.loading import infer_var_config, read_state_dict

    if model in VAR_PRESETS:
        preset = VAR_PRESETS[model]
        return preset.name, preset.var
    if not Path(model).exists():
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(VAR_PRESETS)}) nor an existing file")
    return str(model), infer_var_config(read_state_dict(model), model)


def memory_report(cfg, model_name: str, policy_name: str, policy_args: dict, batch: int, dtype: str,
                  budget_gib: float | None = None, demanding_fraction: float | None = None) -> dict:
    """Everything `amskv memory --json` prints. Per-image figures count K and V of both CFG rows."""
    from amskv.kvcache.policy import make_policy
    from amskv.kvcache.profile import check_profile_depth
    from amskv.memory import fraction_flags, kv_memory, max_batch, plan_kv, static_and_worst

    profile = None
    if demanding_fraction is not None:
        if policy_name not in ("amskv", "amskv-static"):
            raise ValueError(f"--demanding-fraction applies to amskv and amskv-static, not {policy_name!r}")
        policy_args = {k: v for k, v in policy_args.items() if k not in ("profile", "demanding")}
        flags = fraction_flags(cfg.depth, demanding_fraction)
        if policy_name == "amskv-static":
            policy_args["demanding"] = flags
        else:  # online: the flags plan the allocation, as a calibration profile's do
            profile = tuple(c == "1" for c in flags)
    policy = make_policy(policy_name, cfg.patch_nums, policy_args, profile=profile)
    plan = plan_kv(policy, cfg.patch_nums, cfg.depth)  # the plan kv_memory prices
    check_profile_depth(policy, policy_args, cfg.depth)
    mem = kv_memory(cfg, policy, batch, dtype)  # online AMS-KV: the worst case, which is what a batch allocates
    one = kv_memory(cfg, policy, 1, dtype)
    vanilla = kv_memory(cfg, make_policy("vanilla", cfg.patch_nums), 1, dtype)
    full = kv_memory(cfg, make_policy("full", cfg.patch_nums), 1, dtype)
    cases = {name: {"bytes_per_image": m["bytes_per_image"], "peak_stored_bytes_per_image":
                    m["peak_stored_bytes"] // m["batch"], "batch_bytes": m["allocated_bytes"]}
             for name, m in static_and_worst(cfg, policy, batch, dtype).items()}
    report = {
        "model": model_name, "depth": cfg.depth, "embed_dim": cfg.embed_dim, "patch_nums": list(cfg.patch_nums),
        "tokens": cfg.seq_len, "policy": policy.describe(), "dtype": dtype, "batch": batch,
        "demanding_fraction": demanding_fraction,
        # what the last scale attends to besides itself, per layer: the scales kept after the one before it
        "last_scale_reads_scales_per_layer": [list(kept) for kept in plan.kept[-2]],
        "last_scale_reads_tokens_per_layer": [sum(cfg.scale_tokens[s] for s in kept) for kept in plan.kept[-2]],
        "bytes_per_image": one.allocated_bytes,
        "peak_stored_bytes_per_image": one.peak_stored_bytes,
        "peak_working_set_bytes_per_image": one.peak_working_set_bytes,
        "workspace_bytes_per_image": one.workspace_bytes,
        "per_layer_bytes_per_image": list(one.per_layer_bytes),
        "vanilla_bytes_per_image": vanilla.allocated_bytes,
        "vanilla_peak_stored_bytes_per_image": vanilla.peak_stored_bytes,
        "full_bytes_per_image": full.allocated_bytes,
        "full_peak_stored_bytes_per_image": full.peak_stored_bytes,
        "reduction_vs_vanilla": 1 - one.allocated_bytes / vanilla.allocated_bytes,
        "reduction_vs_full": 1 - one.allocated_bytes / full.allocated_bytes,
        "stored_reduction_vs_vanilla": 1 - one.peak_stored_bytes / vanilla.peak_stored_bytes,
        "stored_reduction_vs_full": 1 - one.peak_stored_bytes / full.peak_stored_bytes,
        # the README headline's figures: stored bytes as a share of vanilla's and full's
        "stored_fraction_of_vanilla": one.peak_stored_bytes / vanilla.peak_stored_bytes,
        "stored_fraction_of_full": one.peak_stored_bytes / full.peak_stored_bytes,
        "batch_bytes": mem.allocated_bytes,
        "batch_peak_stored_bytes": mem.peak_stored_bytes,
        "cases": cases,
    }
    if budget_gib is not None:
        budget = int(budget_gib * GIB)
        report.update({
            "budget_bytes": budget,
            "max_batch": max_batch(budget, one.allocated_bytes),
            "vanilla_max_batch": max_batch(budget, vanilla.allocated_bytes),
            "full_max_batch": max_batch(budget, full.allocated_bytes),
        })
    return report


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < GIB else f"{n / GIB:,.2f} GiB"


CASE_LABELS = {"worst_case": "worst case (every layer expands)", "no_expansion": "no layer expands",
               "exact": "exact (per-layer demand flags)"}


def format_table(r: dict) -> str:
    """Every byte figure says whether it is stored (the K/V the cache holds at its peak, the README headline's
    measure) or allocated (what a batch reserves: the stored peak's buffers plus the workspace)."""
    rows = [
        ("model", f"{r['model']} (depth {r['depth']}, width {r['embed_dim']}, {r['tokens']} tokens)"),
        ("policy", r["policy"]), ("dtype / batch", f"{r['dtype']} / {r['batch']}"),
        ("stored per image", f"{_size(r['peak_stored_bytes_per_image'])}: {r['stored_fraction_of_vanilla']:.1%} "
                             f"of vanilla, {r['stored_fraction_of_full']:.1%} of full"),
        ("allocated per image", f"{_size(r['bytes_per_image'])} ({r['bytes_per_image']:,} B): "
                                f"{1 - r['reduction_vs_vanilla']:.1%} of vanilla, {1 - r['reduction_vs_full']:.1%} of full"),
        ("  of which workspace", _size(r["workspace_bytes_per_image"])),
        ("peak attention working set", _size(r["peak_working_set_bytes_per_image"])),
        ("vanilla per image", f"{_size(r['vanilla_peak_stored_bytes_per_image'])} stored, "
                              f"{_size(r['vanilla_bytes_per_image'])} allocated"),
        ("full per image", f"{_size(r['full_peak_stored_bytes_per_image'])} stored, "
                           f"{_size(r['full_bytes_per_image'])} allocated"),
        ("reduction vs vanilla", f"stored {r['stored_reduction_vs_vanilla']:.1%}, "
                                 f"allocated {r['reduction_vs_vanilla']:.1%}"),
        ("reduction vs full", f"stored {r['stored_reduction_vs_full']:.1%}, allocated {r['reduction_vs_full']:.1%}"),
        ("batch allocated", _size(r["batch_bytes"])),
    ]
    cases = r["cases"]
    if "exact" in cases:  # per-layer flags: the worst case is the exact figure, shown once
        cases = {"exact": cases["exact"]}
    if len(cases) > 1 or "exact" in cases:
        for name, case in cases.items():
            rows.append((f"plan: {CASE_LABELS.get(name, name)}",
                         f"{_size(case['peak_stored_bytes_per_image'])} stored, "
                         f"{_size(case['bytes_per_image'])} allocated per image"))
    if "max_batch" in r:
        rows.append((f"max batch in {_size(r['budget_bytes'])} (allocated)",
                     f"{r['max_batch']} (vanilla {r['vanilla_max_batch']}, full {r['full_max_batch']}; cap 256)"))
    per_layer = sorted(set(r["per_layer_bytes_per_image"]))
    rows.append(("per-layer buffer (allocated)", ", ".join(_size(b) for b in per_layer)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from amskv_tools.commands.common import parse_policy_args
    from amskv.config import BUNDLED_MODELS
    from amskv.engine import with_demo_profile
    from amskv.model.loading import CheckpointError

    if args.batch < 1 or (args.budget_gib is not None and args.budget_gib <= 0):
        print("error: need --batch >= 1 and --budget-gib > 0", file=sys.stderr)
        return 2
    try:
        name, cfg = resolve_model(args.model)
        policy_args = parse_policy_args(args.policy_arg)
        if args.model in BUNDLED_MODELS:  # as `amskv serve` runs it: amskv-static with the model's own calibration
            policy_args = with_demo_profile(args.policy, policy_args, args.model)
        report = memory_report(cfg, name, args.policy, policy_args, args.batch, args.dtype, args.budget_gib,
                               args.demanding_fraction)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0
