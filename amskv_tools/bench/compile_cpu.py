"""torch.compile (inductor) on the engine's step, on the CPU: speed against eager, compile time, batch invariance.

    python -m amskv_tools.bench.compile_cpu [--models demo d16w] [--batch 4] [--rounds 5] [--out-dir out/bench]

Variants, applied to one engine's modules in turn (the weights are shared, so every variant runs the same model):

- ``eager``: the engine as it ships.
- ``dense``: ``torch.compile(dynamic=True)`` on each block's dense modules (the FFN, the attention output
  projection, AdaLN); attention and the KV cache stay eager, so dynamo never traces the cache objects.
- ``forward``: ``torch.compile(dynamic=True)`` on ``VAR.run_packed`` and ``VAR.logits_packed``, the whole
  transformer of a step, with the KV cache's ``attend``/``commit`` left eager (``torch.compiler.disable``):
  traced, the cache's Python state (kept scales, lengths) becomes guards that change every scale, and dynamo
  recompiled until its limit (8) and fell back to eager (seen on the first try: 179 s of compiling for nothing).

Timing is one full image set through ``Engine.step`` (one cohort, every scale, decode included), 1 torch thread,
interleaved rounds, medians. Compile time is the first (compiling) pass less the eager median. Invariance is
checked as the engine promises it: image 0's tokens alone, and inside batches of 2, 3 and ``--batch`` images,
must be bit-identical. Prints a Markdown table and writes ``compile_cpu.json`` to ``--out-dir`` (scratch).

Models: ``demo`` (the bundled weights, width 128: overhead-bound) and ``d16w`` (random weights, d16's width
1024 and 16 heads on the 256-px layout, 2 layers so a round takes seconds: GEMM-bound, the shapes of the
issue's end-to-end comparison).
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.utils import counters

from amskv.config import VAR_PRESETS, VARConfig
from amskv.engine import Engine
from amskv.kvcache.storage import LayerKV
from amskv.sampling import SamplingParams
from amskv_tools.bench.common import DEFAULT_OUT_DIR, md_table, median, pin_threads, random_pair, tiny_vae_config

VARIANTS = ("eager", "dense", "forward")
PARAMS = SamplingParams(cfg=4.0, top_k=900, top_p=0.95)


class RecompileLimitHits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past the limit a function runs eager."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage():
            self.hits += 1


def with_mode(engine: Engine, mode: str | None) -> Engine:
    """The engine under batch-invariance ``mode`` when the Engine takes one (issue 23 item 1), else as is."""
    if mode is None or "batch_invariant" not in inspect.signature(Engine.__init__).parameters:
        return engine
    return Engine(engine.var, engine.vae, engine.policy, engine.dtype, engine.device, engine.model_name,
                  batch_invariant=mode)


def build(model: str) -> Engine:
    if model == "demo":
        return Engine.load(policy="vanilla")
    if model == "d16w":  # d16's layer shapes, fewer layers
        d16 = VAR_PRESETS["d16"].var
        cfg = VARConfig(depth=2, embed_dim=d16.embed_dim, num_heads=d16.num_heads, num_classes=d16.num_classes,
                        vocab_size=d16.vocab_size, cvae=d16.cvae, patch_nums=d16.patch_nums)
        var, vae = random_pair(cfg, tiny_vae_config(cfg))
        from amskv.kvcache.policy import make_policy
        return Engine(var, vae, make_policy("vanilla", cfg.patch_nums), torch.float32, torch.device("cpu"),
                      name="d16-width, depth 2")
    raise ValueError(f"unknown model {model!r}")


class Compiled:
    """The compiled callables of one variant, made once (their caches persist) and installed per round."""

    def __init__(self, engine: Engine, variant: str, backend: str = "inductor") -> None:
        self.patches: list[tuple[Any, str, Callable]] = []
        var = engine.var
        if variant == "dense":
            for block in var.blocks:
                for owner, name in ((block, "ffn"), (block.attn, "proj"), (block, "ada_lin")):
                    module = getattr(owner, name, None)
                    if module is not None:
                        fn = torch.compile(module.forward, dynamic=True, backend=backend)
                        self.patches.append((module, "forward", fn))
        elif variant == "forward":
            for name in ("run_packed", "logits_packed"):
                self.patches.append((var, name, torch.compile(getattr(var, name), dynamic=True, backend=backend)))
            for name in ("attend", "commit"):  # a graph break at each cache call, see the module docstring
                self.patches.append((LayerKV, name, torch.compiler.disable(getattr(LayerKV, name))))

    @contextmanager
    def installed(self) -> Iterator[None]:
        # an instance attribute shadows the class's method (deleting it restores eager); a class attribute is
        # put back as it was
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in self.patches]
        for obj, name, fn in self.patches:
            setattr(obj, name, fn)
        try:
            yield
        finally:
            for obj, name, old in reversed(saved):
                if old is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)


def run_images(engine: Engine, labels: list[int], seeds: list[int]) -> list[torch.Tensor]:
    """Every scale of one cohort through ``Engine.step``; the tokens per scale."""
    pool = engine.new_pool(len(labels))
    cohort = engine.start_cohort(pool, 0, labels, seeds, [PARAMS] * len(labels), list(range(len(labels))))
    while not engine.step([cohort]).finished:
        pass
    return cohort.tokens


def invariant(engine: Engine, batch: int) -> bool:
    """Image 0 (label 1, seed 7) bit-identical alone and beside 1, 2 and batch - 1 others."""
    n_cls = engine.num_classes
    alone = run_images(engine, [1], [7])
    for size in sorted({2, 3, batch}):
        labels, seeds = [1] + [(3 * i) % n_cls for i in range(1, size)], [7] + list(range(100, 100 + size - 1))
        mixed = run_images(engine, labels, seeds)
        if not all(torch.equal(a[0], m[0]) for a, m in zip(alone, mixed, strict=True)):
            return False
    return True


def measure(model: str, batch: int, rounds: int, mode: str | None) -> dict:
    torch._dynamo.reset()
    limit = RecompileLimitHits()
    logging.getLogger("torch._dynamo").addHandler(limit)
    engine = with_mode(build(model), mode)
    labels = [i % engine.num_classes for i in range(batch)]
    seeds = list(range(batch))
    compiled = {v: Compiled(engine, v) for v in VARIANTS}
    first: dict[str, float] = {}
    graphs: dict[str, int] = {}
    reference: list[torch.Tensor] | None = None
    same_as_eager: dict[str, bool] = {}
    with torch.inference_mode():
        for v in VARIANTS:  # the first pass compiles (dynamic shapes: one graph serves every batch and scale)
            graphs_before = counters["stats"]["unique_graphs"]
            with compiled[v].installed():
                t0 = time.perf_counter()
                tokens = run_images(engine, labels, seeds)
                first[v] = time.perf_counter() - t0
            graphs[v] = counters["stats"]["unique_graphs"] - graphs_before
            reference = tokens if reference is None else reference
            same_as_eager[v] = all(torch.equal(a, b) for a, b in zip(reference, tokens, strict=True))
        total_graphs = counters["stats"]["unique_graphs"]
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds):  # interleaved, the start rotating
            for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                with compiled[v].installed():
                    t0 = time.perf_counter()
                    run_images(engine, labels, seeds)
                    samples[v].append(time.perf_counter() - t0)
        later_graphs = counters["stats"]["unique_graphs"] - total_graphs
        invariance = {}
        for v in VARIANTS:
            with compiled[v].installed():
                invariance[v] = invariant(engine, batch)
    eager = median(samples["eager"])
    logging.getLogger("torch._dynamo").removeHandler(limit)
    mode_name = getattr(getattr(engine, "invariance", None), "mode", mode)
    rows = [{"model": model, "invariance": mode_name, "variant": v, "batch": batch,
             "seconds_median": median(samples[v]),
             "vs_eager": median(samples[v]) / eager,
             # the same round's eager run as the reference: steadier than the medians' ratio on a busy machine
             "vs_eager_per_round": median([t / e for t, e in zip(samples[v], samples["eager"], strict=True)]),
             "first_pass_s": first[v],
             "compile_s": max(0.0, first[v] - median(samples[v])), "tokens_equal_eager": same_as_eager[v],
             "graphs_first_pass": graphs[v],
             "batch_invariant": invariance[v], "runs": samples[v]} for v in VARIANTS]
    # graphs compiled during the timed rounds, all variants together: recompiles the first passes did not cover
    return {"model": engine.model_name, "invariance": mode_name, "rows": rows, "graphs_after_first_pass": later_graphs,
            "recompile_limit_hits": limit.hits}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "d16w"], choices=["demo", "d16w"])
    parser.add_argument("--invariance", nargs="+", default=["off", "auto"],
                        help="Engine batch_invariant modes to measure under (ignored where the Engine has none)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    compiler = shutil.which("g++") or shutil.which("c++")  # inductor's CPU backend compiles C++ with it
    results = [measure(m, args.batch, args.rounds, mode) for m in args.models for mode in args.invariance]
    rows = [r for res in results for r in res["rows"]]
    print(md_table(["model", "invariance", "variant", "batch", "s per image set (median)", "vs eager",
                    "vs eager, per round", "compile s",
                    "tokens = eager", "batch-invariant"],
                   [[r["model"], r["invariance"], r["variant"], r["batch"], r["seconds_median"], r["vs_eager"],
                     r["vs_eager_per_round"], r["compile_s"],
                     r["tokens_equal_eager"], r["batch_invariant"]] for r in rows]))
    data = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "cxx": compiler,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_cpu.json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"json: {out / 'compile_cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
