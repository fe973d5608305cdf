"""The KV-policy comparisons behind docs/demo-model.md (155-token demo) and docs/mnist64-sweep.md (680 tokens).

Every row is one policy evaluated with ``amskv_tools.demo.quality.evaluate`` at the same seeds as `full`. The
noise of a row is measured, not assumed (``QualityReport.accuracy_se`` and ``psnr_se``, from blocks of 100). Calibration uses seeds 0-31 (`amskv analyze`), so an
evaluation seed >= 1000 keeps the two disjoint.
"""
from __future__ import annotations

from amskv_tools.demo.classifier import load_classifier
from amskv_tools.demo.quality import evaluate, sample
from amskv.kvcache.policy import layout_key
from amskv.kvcache.profile import read_profile
from amskv.sampling import SamplingParams

# The comparison of docs/demo-model.md: (label, policy, args). c_min/c_max are tokens per layer and sequence;
# the demo's scales hold 1, 4, 9, 16, 25, 36 and 64 tokens (condensed scales 0-1: 5 tokens).
SWEEP_DEMO: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("vanilla", "vanilla", {}),
    ("amskv default preset", "amskv", {}),
    ("amskv aggressive preset", "amskv", {"preset": "aggressive"}),
    ("amskv-static default, shipped profile", "amskv-static", {"profile": "bundled"}),
    ("amskv cds=2 c_min=41 c_max=66 theta=0.45", "amskv", {"c_cds": 2, "c_min": 41, "c_max": 66, "theta": 0.45}),
    ("amskv cds=1 c_min=37 c_max=62 theta=0.45", "amskv", {"c_cds": 1, "c_min": 37, "c_max": 62, "theta": 0.45}),
    ("amskv-static default, layer 3 demanding instead", "amskv-static", {"demanding": "0001"}),
    ("amskv-static cds=2 41/66, layer 0 demanding", "amskv-static",
     {"c_cds": 2, "c_min": 41, "c_max": 66, "demanding": "1000"}),
    ("amskv cds=2 c_min=c_max=41 (no expansion)", "amskv", {"c_cds": 2, "c_min": 41, "c_max": 41}),
    ("amskv cds=2 c_min=c_max=66 (all layers expanded)", "amskv", {"c_cds": 2, "c_min": 66, "c_max": 66}),
    ("window w=1", "window", {"window": 1}),
    ("window w=2", "window", {"window": 2}),
    ("sink 1 + w=1", "sink", {"sink": 1, "window": 1}),
    ("sink 2 + w=1", "sink", {"sink": 2, "window": 1}),
    ("sink 2 + w=2", "sink", {"sink": 2, "window": 2}),
    ("current scale only (window w=0)", "window", {"window": 0}),
]

# The comparison on the released 256-px layout (mnist64: scales of 1, 4, 9, 16, 25, 36, 64, 100, 169 and 256
# tokens). Token budgets per layer: condensed scales 0-1 = 5; + 13x13 = 174; + 10x10 = 274; + 8x8 = 338;
# everything but the last scale = 424 (`full`). "profile" rows take the demanding layers from the shipped
# calibration; "anti" flags the same number of layers, the most similar ones instead of the least.
SWEEP_256: list[tuple[str, str, dict]] = [
    ("full", "full", {}),
    ("vanilla (same attention as full: its images are full's, not generated again)", "vanilla", {}),
    ("window w=1", "window", {"window": 1}),
    ("window w=2", "window", {"window": 2}),
    ("window w=3", "window", {"window": 3}),
    ("sink 2 + w=1", "sink", {"sink": 2, "window": 1}),
    ("sink 2 + w=2", "sink", {"sink": 2, "window": 2}),
    ("amskv-static 174/274, calibrated", "amskv-static", {"c_min": 174, "c_max": 274, "profile": "bundled"}),
    ("amskv-static 174/274, most similar layers demanding", "amskv-static",
     {"c_min": 174, "c_max": 274, "profile": "anti"}),
    ("uniform budget at the bytes of 174/274", "amskv-static", {"c_min": "equal", "c_max": "equal",
                                                                "demanding": "none"}),
    ("amskv-static 174/338, calibrated", "amskv-static", {"c_min": 174, "c_max": 338, "profile": "bundled"}),
    ("amskv-static 174/174 (no layer expands)", "amskv-static", {"c_min": 174, "c_max": 174, "demanding": "none"}),
    ("efficient layers skip 13x13 (105/274, evict newest)", "amskv-static",
     {"c_min": 105, "c_max": 274, "evict_newest": True, "profile": "bundled"}),
    ("previous default 100/155 (no layer caches 13x13)", "amskv-static",
     {"c_min": 100, "c_max": 155, "profile": "bundled"}),
]

SWEEPS = {"demo": SWEEP_DEMO, "256": SWEEP_256}


def resolve_args(args: dict, profile_path, depth: int) -> dict | None:
    """Concrete policy arguments of a sweep row; None when the row needs a profile and none was given."""
    args = dict(args)
    if args.get("profile") in ("bundled", "anti"):
        if profile_path is None:
            return None
        if args["profile"] == "anti":  # as many layers as the calibration flags, the most similar ones
            profile = read_profile(profile_path)
            order = sorted(range(depth), key=lambda layer: -profile.layer_similarity[layer])
            chosen = set(order[:sum(profile.demanding)])
            args["demanding"] = "".join("1" if layer in chosen else "0" for layer in range(depth))
            del args["profile"]
        else:
            args["profile"] = str(profile_path)
    if args.get("demanding") == "none":
        args["demanding"] = "0" * depth
    if args.get("c_min") == "equal":  # every layer gets the mean budget of calibrated 174/274
        if profile_path is None:
            return None
        demanding = sum(read_profile(profile_path).demanding)
        mean = (demanding * 274 + (depth - demanding) * 174) // depth
        args["c_min"] = args["c_max"] = mean
    return args


def sweep(engine, n: int, seed: int, cfgs: tuple[float, ...], profile_path=None, progress=print) -> list[dict]:
    """One row per (policy, cfg); the `full` samples at each cfg are made once and shared."""
    classifier = load_classifier()
    rows = []
    table = SWEEPS[layout_key(engine.config.patch_nums)]
    for cfg in cfgs:
        reference = sample(engine.with_policy("full"), n, seed, SamplingParams(cfg=cfg, top_k=0, top_p=0.0))
        for label, name, args in table:
            args = resolve_args(args, profile_path, engine.config.depth)
            if args is None:
                continue  # no profile given: the row is left out
            # vanilla attends exactly as full does (only its memory differs; tests/amskv/test_memory.py checks
            # the tokens are equal), so on the 680-token sweep its row reuses full's images
            reuse = name == "full" or (name == "vanilla" and table is SWEEP_256)
            report, _ = evaluate(engine.with_policy(name, args), n, seed, cfg, reference, classifier,
                                 reuse_reference=reuse)
            row = {"label": label, "policy_name": name, "policy_args": args, **report.to_dict()}
            progress(f"cfg {cfg} {label}: acc {row['accuracy']:.4f} fd {row['fd']:.3f} "
                     f"psnr {row['psnr_vs_full']} stored {row['stored_fraction_of_vanilla']:.3f}")
            rows.append(row)
    return rows
