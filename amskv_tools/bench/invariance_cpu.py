"""Cost of batch invariance on the CPU, per GEMM and for the VQVAE's Phi convolutions.

    python amskv_tools/bench/invariance_cpu.py [--preset d16] [--rounds 5] [--threads 1] [--out-dir DIR] [--tiny]

GEMMs: at the model's token-level shapes (qkv, proj, fc1, fc2 and the head; the AdaLN layers see only 2 rows
per image), for M = 1 ... 4096 rows, plain ``F.linear`` against the form ``auto`` chooses on this machine
(amskv/model/invariance_probe.py) and the fixed 64-row tiles (``invariant_linear``). A variant's time at an M
is the sum over the shapes. Phi: the quantiser's refinement convolution on a batch of f_hat maps, plain against
fixed groups of 8 images (``in_fixed_batches``), which the sampler runs once per scale.

Variants run interleaved (each round runs every variant once, the start rotating) and the medians are
compared, since this machine is shared. Prints a Markdown table and one JSON object, and writes
``invariance_cpu.json`` / ``.md`` to ``--out-dir`` (default out/bench, git-ignored).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from amskv.config import VAR_PRESETS, VARConfig
from amskv.model.invariance_probe import check_form, scheduler_row_counts
from amskv.model.invariant import GemmForm, in_fixed_batches, invariant_linear
from amskv_tools.bench.common import DEFAULT_OUT_DIR

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TINY_ROWS = (1, 16, 64, 130)


def token_shapes(cfg: VARConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of the GEMMs that run on every token: the four of a block and the head."""
    C, hidden = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio)
    return {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, hidden), "fc2": (hidden, C), "head": (C, cfg.vocab_size)}


def interleaved(variants: dict[str, Callable[[], object]], rounds: int,
                sample_s: float = 0.2) -> dict[str, list[float]]:
    """Seconds per call of each variant per round; each round runs all of them, starting one further along.

    A sample repeats a call until it lasts about ``sample_s`` (the same count for every variant), so that a
    millisecond GEMM is not one scheduler tick on this shared machine."""
    names = list(variants)
    for fn in variants.values():  # warm-up: first calls allocate and pick kernels
        fn()
    began = time.perf_counter()
    variants[names[0]]()
    repeats = max(1, int(sample_s / max(time.perf_counter() - began, 1e-6)))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            began = time.perf_counter()
            for _ in range(repeats):
                variants[name]()
            seconds[name].append((time.perf_counter() - began) / repeats)
    return seconds


def gemm_table(cfg: VARConfig, rows: tuple[int, ...], rounds: int,
               sample_s: float) -> tuple[list[dict], dict[str, str]]:
    """Per M: the median seconds of plain, chosen and tiles summed over the token shapes, and the ratios."""
    gen = torch.Generator().manual_seed(0)
    shapes = token_shapes(cfg)
    weights = {name: (torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen))
               for name, (k, n) in shapes.items()}
    counts = scheduler_row_counts(cfg.scale_tokens)
    with torch.no_grad():
        forms = {name: check_form((k, n, torch.float32, "linear"), torch.device("cpu"), counts)
                 for name, (k, n) in shapes.items()}
    table = []
    for m in rows:
        xs = {name: torch.randn(m, k, generator=gen) for name, (k, _) in shapes.items()}

        def timed(linear: Callable[..., torch.Tensor], chosen: bool = False,
                  xs: dict[str, torch.Tensor] = xs) -> Callable[[], None]:
            def call() -> None:
                with torch.no_grad():
                    for name, (w, b) in weights.items():
                        (forms[name].linear if chosen else linear)(xs[name], w, b)
            return call

        seconds = interleaved({"plain": timed(F.linear), "chosen": timed(F.linear, chosen=True),
                               "tiles": timed(invariant_linear)}, rounds, sample_s)
        med = {name: statistics.median(s) for name, s in seconds.items()}
        table.append({"M": m, "plain_s": med["plain"], "chosen_s": med["chosen"], "tiles_s": med["tiles"],
                      "chosen_ratio": med["chosen"] / med["plain"], "tiles_ratio": med["tiles"] / med["plain"],
                      "runs": seconds})
    return table, {name: describe(form) for name, form in forms.items()}


def describe(form: GemmForm) -> str:
    return f"floor {form.floor}, pieces of {form.chunk}" if form.kind == "floor" else form.kind


def phi_table(cvae: int, side: int, batches: tuple[int, ...], rounds: int, sample_s: float) -> list[dict]:
    """The Phi convolution (3x3, cvae -> cvae on side x side maps) plain against fixed groups of 8 images."""
    conv = torch.nn.Conv2d(cvae, cvae, 3, 1, 1).eval()
    table = []
    for batch in batches:
        h = torch.randn(batch, cvae, side, side)
        def plain(h: torch.Tensor = h) -> torch.Tensor:
            return conv(h)

        def fixed(h: torch.Tensor = h) -> torch.Tensor:
            return in_fixed_batches(conv, h)

        with torch.no_grad():
            seconds = interleaved({"plain": plain, "fixed": fixed}, rounds, sample_s)
        med = {name: statistics.median(s) for name, s in seconds.items()}
        table.append({"batch": batch, "plain_ms": 1e3 * med["plain"], "fixed_ms": 1e3 * med["fixed"],
                      "ratio": med["fixed"] / med["plain"]})
    return table


def markdown(data: dict) -> str:
    lines = [f"# Batch invariance on the CPU ({data['preset']}, {data['threads']} thread(s), {data['rounds']} "
             f"interleaved rounds of ~{data['sample_s']} s samples, medians per call)", "",
             f"Forms `auto` chose: {', '.join(f'{k}: {v}' for k, v in data['forms'].items())}", "",
             "| M | plain F.linear ms | chosen ms | chosen / plain | tiles ms | tiles / plain |",
             "|---|---|---|---|---|---|"]
    for r in data["gemm"]:
        lines.append(f"| {r['M']} | {1e3 * r['plain_s']:.2f} | {1e3 * r['chosen_s']:.2f} | {r['chosen_ratio']:.3f} "
                     f"| {1e3 * r['tiles_s']:.2f} | {r['tiles_ratio']:.3f} |")
    lines += ["", "| Phi batch | plain ms | fixed groups of 8 ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['plain_ms']:.3f} | {r['fixed_ms']:.3f} | {r['ratio']:.2f} |" for r in data["phi"]]
    return "\n".join(lines) + "\n"


def run(preset: str, rows: tuple[int, ...], rounds: int, threads: int, out_dir: Path,
        phi_batches: tuple[int, ...] = (1, 4, 32), sample_s: float = 0.2) -> dict:
    torch.set_num_threads(threads)
    cfg = VAR_PRESETS[preset].var
    gemm, forms = gemm_table(cfg, rows, rounds, sample_s)
    data = {"preset": preset, "threads": threads, "rounds": rounds, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "forms": forms, "gemm": gemm,
            "sample_s": sample_s, "phi": phi_table(cfg.cvae, cfg.patch_nums[-1], phi_batches, rounds, sample_s)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "invariance_cpu.json").write_text(json.dumps(data, indent=1))
    (out_dir / "invariance_cpu.md").write_text(markdown(data))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="d16", choices=sorted(VAR_PRESETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    parser.add_argument("--tiny", action="store_true", help="the demo model's shapes, 4 row counts, 2 rounds")
    args = parser.parse_args(argv)
    if args.tiny:
        data = run("demo", TINY_ROWS, 2, args.threads, Path(args.out_dir), phi_batches=(1, 4), sample_s=0.01)
    else:
        data = run(args.preset, ROWS, args.rounds, args.threads, Path(args.out_dir))
    print(markdown(data))
    print(json.dumps({k: v for k, v in data.items() if k != "gemm"} | {"gemm": [
        {k: v for k, v in r.items() if k != "runs"} for r in data["gemm"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
