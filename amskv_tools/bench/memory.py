"""Suite `memory`: KV bytes per image and per batch, reductions, and the max batch under a device budget.

Everything but the last section is arithmetic (``amskv.memory``), which replays each policy over token
counts. The last section checks that arithmetic against the bytes a real generation allocates and holds
(VAR-d16 shape, random weights, bf16, on the CPU).
"""
from __future__ import annotations

import math
import time

import torch

from amskv_tools.bench.common import GIB, MIB, Plot, Report, md_table, random_pair, tiny_vae_config, tiny_var_config
from amskv.config import VAR_PRESETS, VARConfig
from amskv.kvcache.policy import make_policy
from amskv.memory import DTYPES, fraction_flags, kv_memory, never_demanding

MODELS = ("d16", "d20", "d24", "d30", "d36")
# (label, policy name, policy args). amskv-static without a profile counts every layer as cache-demanding: the
# same bytes as online amskv's worst case. "25 % demanding" is the share the calibration flags by default
# (AMSKV_CALIBRATION_DEMANDING_FRACTION); the real share is a property of each checkpoint, so that row is modelled.
POLICIES: tuple[tuple[str, str, dict], ...] = (
    ("vanilla", "vanilla", {}),
    ("full", "full", {}),
    ("window", "window", {}),
    ("sink", "sink", {}),
    ("amskv default", "amskv", {}),
    ("amskv aggressive", "amskv", {"preset": "aggressive"}),
    ("amskv-static", "amskv-static", {}),
    ("amskv-static, 25 % demanding", "amskv-static", {"demanding_fraction": 0.25}),
)
DTYPE_NAMES = ("bf16", "fp16")
BUDGETS_GIB = (40, 60, 80)
PROBE_BATCHES = (64, 128, 256)
# Parameter counts of the released VAR checkpoints (verified against them) and the VQVAE.
VAR_PARAMS = {"d16": 310_283_520, "d20": 600_917_136, "d24": 1_033_399_360, "d30": 2_010_020_356,
              "d36": 2_353_893_904}
VQVAE_PARAMS = 109_000_000
DECODE_CHUNK = 8  # amskv.engine.DECODE_CHUNK: images per decoder call


def bench_policy(name: str, cfg: VARConfig, args: dict):
    """make_policy, with ``demanding_fraction`` turned into per-layer flags for this depth."""
    args = dict(args)
    if "demanding_fraction" in args:
        args["demanding"] = fraction_flags(cfg.depth, args.pop("demanding_fraction"))
    return make_policy(name, cfg.patch_nums, args)


def weights_bytes(model: str, dtype: torch.dtype) -> int:
    """VAR at the serving precision (2 bytes/param in bf16/fp16) plus the VQVAE, which stays fp32."""
    return VAR_PARAMS[model] * torch.empty((), dtype=dtype).element_size() + VQVAE_PARAMS * 4


def activation_phases(cfg: VARConfig, dtype: torch.dtype) -> dict[str, int]:
    """Largest transients per image at the last scale (T = its tokens, rows = 2 for CFG), by phase.

    - head phase (after the blocks): fp32 logits 2 rows x T x V x 4 bytes, about 3 copies alive (head output,
      CFG mix, top-k/top-p sort values and indices), plus the fp32 hidden state and its normed copy;
    - block phase: FFN hidden 2 rows x T x 4C with fc1 output and GELU output alive together (x 2), plus
      q, k, v and four C-wide tensors (residual, normed input, attention output, projection).
    The phases do not overlap in time. Attention scores are not counted: flash-style kernels never store them.
    """
    T, C, V = cfg.scale_tokens[-1], cfg.embed_dim, cfg.vocab_size
    elt = torch.empty((), dtype=dtype).element_size()
    head = 2 * T * V * 4 * 3 + 2 * T * C * 4 * 2
    block = 2 * T * round(cfg.mlp_ratio * C) * elt * 2 + 2 * T * C * (3 + 4) * elt
    return {"head_phase": head, "block_phase": block}


def activation_bytes_per_image(cfg: VARConfig, dtype: torch.dtype) -> int:
    return max(activation_phases(cfg, dtype).values())


def decoder_bytes(model: str) -> int:
    """VQVAE decode of one chunk of 8 images at full resolution: ~4 live maps of 160 ch in fp32."""
    res = VAR_PRESETS[model].vae.resolution
    return DECODE_CHUNK * VAR_PRESETS[model].vae.ch * res * res * 4 * 4


def fit_batch(budget: int, fixed: int, per_image: int) -> int:
    return max(0, (budget - fixed) // per_image)


def policy_table(models=MODELS, dtypes=DTYPE_NAMES) -> list[dict]:
    rows = []
    for model in models:
        cfg = VAR_PRESETS[model].var
        for dname in dtypes:
            base = {n: kv_memory(cfg, make_policy(n, cfg.patch_nums), 1, dname) for n in ("vanilla", "full")}
            for label, name, args in POLICIES:
                policy = bench_policy(name, cfg, args)
                mem = kv_memory(cfg, policy, 1, dname)
                row = {"model": model, "px": VAR_PRESETS[model].vae.resolution, "dtype": dname, "policy": label,
                       "policy_params": policy.describe(), "allocated_bytes_per_image": mem.allocated_bytes,
                       "stored_bytes_per_image": mem.peak_stored_bytes, "workspace_bytes_per_image": mem.workspace_bytes}
                if name == "amskv":  # online: storage allocates the worst case; no layer expanding is the floor
                    row["stored_bytes_per_image_no_expansion"] = kv_memory(
                        cfg, policy, 1, dname, similarity=never_demanding).peak_stored_bytes
                for ref, m in base.items():
                    row[f"stored_vs_{ref}"] = mem.peak_stored_bytes / m.peak_stored_bytes
                    row[f"allocated_vs_{ref}"] = mem.allocated_bytes / m.allocated_bytes
                row["reduction_vs_vanilla_pct"] = 100 * (1 - row["stored_vs_vanilla"])
                rows.append(row)
    return rows


def batch_table(rows: list[dict], budgets=BUDGETS_GIB, dtype_name: str = "bf16") -> list[dict]:
    out = []
    for row in rows:
        if row["dtype"] != dtype_name:
            continue
        model, dtype = row["model"], DTYPES[dtype_name]
        cfg = VAR_PRESETS[model].var
        fixed = weights_bytes(model, dtype) + decoder_bytes(model)
        act = activation_bytes_per_image(cfg, dtype)
        per_image = row["allocated_bytes_per_image"] + act
        entry = {"model": model, "policy": row["policy"], "weights_bytes": weights_bytes(model, dtype),
                 "decoder_bytes": decoder_bytes(model), "activation_bytes_per_image": act,
                 "activation_phases_per_image": activation_phases(cfg, dtype),
                 "kv_bytes_per_image": row["allocated_bytes_per_image"], "max_batch": {}, "fits": {}}
        for gib in budgets:
            entry["max_batch"][str(gib)] = fit_batch(gib * GIB, fixed, per_image)
            entry["fits"][str(gib)] = {str(b): fixed + b * per_image <= gib * GIB for b in PROBE_BATCHES}
        out.append(entry)
    return out


def measured_check(tiny: bool = False, batches=(1, 2)) -> list[dict]:
    """Bytes a real generation allocates and holds, against the arithmetic, for every policy."""
    from amskv.generate import generate_tokens
    from amskv.sampling import RowParams, SamplingParams

    if tiny:
        var_cfg = tiny_var_config()
        vae_cfg = tiny_vae_config(var_cfg)
    else:
        var_cfg, vae_cfg = VAR_PRESETS["d16"].var, VAR_PRESETS["d16"].vae
    var, vae = random_pair(var_cfg, vae_cfg, torch.bfloat16)
    out = []
    for batch in batches:
        labels = torch.arange(batch, dtype=torch.int64) % var_cfg.num_classes
        seeds = torch.arange(batch, dtype=torch.int64) + 1
        params = RowParams.stack([SamplingParams(cfg=1.5, top_k=900, top_p=0.96)] * batch, torch.device("cpu"))
        for label, name, args in POLICIES:
            policy = bench_policy(name, var_cfg, args)
            t0 = time.perf_counter()
            res = generate_tokens(var, vae, labels, seeds, params, policy)
            seconds = time.perf_counter() - t0
            expanded = dict(res.expansions)

            def replay(layer: int, si: int, expanded=expanded) -> float:  # the run's own expansions
                return -math.inf if expanded.get(layer) == si else math.inf

            predicted = kv_memory(var_cfg, bench_policy(name, var_cfg, args), batch, torch.bfloat16)
            replayed = kv_memory(var_cfg, bench_policy(name, var_cfg, args), batch, torch.bfloat16,
                                 similarity=replay)
            out.append({"model": "tiny-d2" if tiny else "d16", "batch": batch, "policy": label,
                        "measured_allocated_bytes": res.kv_allocated_bytes,
                        "predicted_allocated_bytes": predicted.allocated_bytes,
                        "measured_stored_bytes": res.kv_peak_stored_bytes,
                        "predicted_stored_bytes": replayed.peak_stored_bytes,
                        "layers_expanded": len(expanded), "seconds": round(seconds, 2),
                        "match": res.kv_allocated_bytes == predicted.allocated_bytes
                        and res.kv_peak_stored_bytes == replayed.peak_stored_bytes})
    return out


def run_suite(tiny: bool = False, measure: bool = True) -> Report:
    models = ("d16",) if tiny else MODELS
    rows = policy_table(models)
    batches = batch_table(rows)
    checks = measured_check(tiny=tiny) if measure else []
    md = [_policy_md(rows), "", _batch_md(batches), "", _fits_md(batches)]
    if checks:
        md += ["", "### Arithmetic against measured bytes (random weights, bf16, CFG)", "",
               md_table(["model", "batch", "policy", "allocated: measured", "predicted", "stored: measured",
                         "predicted", "layers expanded", "match"],
                        [[c["model"], c["batch"], c["policy"], c["measured_allocated_bytes"],
                          c["predicted_allocated_bytes"], c["measured_stored_bytes"], c["predicted_stored_bytes"],
                          c["layers_expanded"], "yes" if c["match"] else "NO"] for c in checks])]
    notes = [
        "Per image counts K and V of both CFG rows. 'stored' = the most the cache holds at once (the paper's KV "
        "cache); 'allocated' = layer buffers + the shared attention workspace (what a batch reserves).",
        "Online amskv allocates its worst case (every layer expands at its first overflow); the realised "
        "storage lies between 'no expansion' and that. amskv-static without a calibration profile is that worst case.",
        "Max batch = (budget - weights - decoder chunk) / (KV allocated + activation peak per image). Weights: "
        "released-checkpoint parameter counts x 2 bytes + VQVAE 109M x 4 bytes (fp32). Activation peak per image "
        "at the last scale = max of two phases that never overlap: head (fp32 logits 2 x T x V x 4 B x 3 copies + "
        "fp32 hidden x 2) and blocks (FFN hidden 2 x T x 4C x 2 B x 2 + q/k/v and four C-wide tensors); no "
        "attention score matrix (flash-style kernel). Decoder: one chunk of 8 images. No fragmentation margin.",
    ]
    plots = [Plot("bytes_per_image", lambda ax: _plot_bytes(ax, rows), "KV bytes per image (bf16, CFG), allocated"),
             Plot("max_batch", lambda ax: _plot_batch(ax, batches), "Max batch under 80 GiB (bf16)")]
    data = {"policies": rows, "batch": batches, "measured": checks,
            "headline": headline(rows, batches)}
    return Report("memory", data, "\n".join(md), plots, notes)


def headline(rows: list[dict], batches: list[dict]) -> dict:
    out = {}
    pick = {(r["model"], r["policy"], r["dtype"]): r for r in rows}
    mb = {(b["model"], b["policy"]): b["max_batch"] for b in batches}
    for model in {r["model"] for r in rows}:
        for label in ("amskv default", "amskv aggressive"):
            r = pick[(model, label, "bf16")]
            out[f"{model} {label}"] = {
                "stored_vs_vanilla": round(r["stored_vs_vanilla"], 4),
                "allocated_vs_vanilla": round(r["allocated_vs_vanilla"], 4),
                "max_batch_vs_full": {g: (mb[(model, label)][g] / mb[(model, "full")][g]
                                          if mb[(model, "full")][g] else math.inf) for g in mb[(model, label)]},
            }
    return out


def _policy_md(rows) -> str:
    keep = [r for r in rows if r["dtype"] == "bf16"]
    return "### KV bytes per image (bf16; fp16 is byte-identical, both are in the JSON)\n\n" + md_table(
        ["model", "px", "policy", "allocated MiB/img", "stored MiB/img", "stored vs vanilla", "stored vs full",
         "reduction vs vanilla"],
        [[r["model"], r["px"], r["policy"], r["allocated_bytes_per_image"] / MIB, r["stored_bytes_per_image"] / MIB,
          f"{r['stored_vs_vanilla']:.3f}", f"{r['stored_vs_full']:.3f}", f"{r['reduction_vs_vanilla_pct']:.1f} %"]
         for r in keep])


def _batch_md(batches) -> str:
    heads = ["model", "policy", "KV MiB/img", "act. MiB/img"] + [f"max batch @ {g} GiB" for g in BUDGETS_GIB]
    return "### Max batch under a device budget (bf16, CFG)\n\n" + md_table(
        heads, [[b["model"], b["policy"], b["kv_bytes_per_image"] / MIB, b["activation_bytes_per_image"] / MIB]
                + [b["max_batch"][str(g)] for g in BUDGETS_GIB] for b in batches])


def _fits_md(batches) -> str:
    sel = [b for b in batches if b["model"] in ("d30", "d36") and b["policy"] in
           ("vanilla", "full", "amskv default", "amskv aggressive")]
    heads = ["model", "policy"] + [f"B={b} @ {g} GiB" for g in BUDGETS_GIB for b in PROBE_BATCHES]
    return "### Where vanilla stops and AMS-KV still fits (fits / OOM)\n\n" + md_table(
        heads, [[b["model"], b["policy"]] + ["fits" if b["fits"][str(g)][str(n)] else "OOM"
                                             for g in BUDGETS_GIB for n in PROBE_BATCHES] for b in sel])


def _plot_bytes(ax, rows) -> None:
    keep = [r for r in rows if r["dtype"] == "bf16"]
    models = sorted({r["model"] for r in keep}, key=MODELS.index)
    labels = [p[0] for p in POLICIES]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ys = [next(r["allocated_bytes_per_image"] for r in keep if r["model"] == m and r["policy"] == label) / MIB
              for m in models]
        ax.bar([j + i * width for j in range(len(models))], ys, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_yscale("log")
    ax.set_ylabel("MiB per image")
    ax.legend(fontsize=7, ncol=2)


def _plot_batch(ax, batches) -> None:
    models = sorted({b["model"] for b in batches}, key=MODELS.index)
    for label in ("vanilla", "full", "window", "sink", "amskv default", "amskv aggressive"):
        ys = [next(b["max_batch"]["80"] for b in batches if b["model"] == m and b["policy"] == label) for m in models]
        ax.plot(models, ys, marker="o", label=label)
    ax.axhline(256, color="grey", ls="--", lw=1)
    ax.set_yscale("log", base=2)
    ax.set_ylabel("images per batch")
    ax.legend(fontsize=7)
